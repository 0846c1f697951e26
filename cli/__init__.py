"""The `fedtune` command: the composition root that puts every part's sub-commands together."""

if __name__ != "fedtune.cli":  # imported by a top-level name: the repository root is on sys.path
    raise ModuleNotFoundError(f"No module named {__name__!r}: this folder is fedtune.cli; import that "
                              "(the repository root on sys.path would shadow installed packages)", name=__name__)

import typer

from fedtune.cli.demo import demo
from fedtune.client_agent.cli import app as agent_app
from fedtune.compliance.cli import AUDIT_HELP, keygen, verify
from fedtune.coordinator.audit_cli import checkpoint, export, lineage, processing
from fedtune.coordinator.cli import app as coordinator_app
from fedtune.model.cli import app as model_app

app = typer.Typer(
    help="fedtune: federated, differentially private LoRA fine-tuning.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
# `fedtune audit`: compliance's offline commands (verify, keygen) beside the coordinator's, which read its store
audit_app = typer.Typer(help=AUDIT_HELP, no_args_is_help=True)
for command in (export, verify, checkpoint, keygen, lineage, processing):
    audit_app.command()(command)

app.add_typer(model_app, name="model")
app.add_typer(agent_app, name="agent")
app.add_typer(audit_app, name="audit")
app.add_typer(coordinator_app, name="coordinator")
app.command()(demo)
