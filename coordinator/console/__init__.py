"""The web console: operators and auditors see and steer the federation in a browser.

Served by ``fedtune coordinator serve`` on the admin API's own origin at ``/console`` (HTTPS when TLS
is configured). :mod:`.routes` signs people in (an admin-API token for a session cookie) and serves
one page shell, a script and a style sheet from this package; the script draws every page from the
admin API itself, with the session cookie and the session's CSRF token, so a role can do in the
console exactly what it can do in the API and every request is in the audit trail like any other.
docs/console.md shows the pages.
"""
