"""At the same epsilon, does a site that shares its task do better with the federated adapter than alone?

    .venv/bin/python benchmarks/federated_utility.py                      # the full grid (~45 min, 2 cores)
    .venv/bin/python benchmarks/federated_utility.py --sites 3 --records 64 --quick
    .venv/bin/python benchmarks/federated_utility.py --epsilon 8 --alpha 0.3 --json out.json

The task is the demo's shared one (`cli/demo/sites.py`): a triage note ("note, age 41: chest
pain") -> its triage level (" 1", " 2" or " 3"), eight key phrases. K sites each draw their own
label mix from Dirichlet(alpha) (alpha 0.3: strong label skew, a site sees mostly one or two
levels; alpha 10: nearly the same mix everywhere), then n training and `--heldout` held-out
records from it. The base is the demo's (`build_base`: the random `tiny` preset, int4), so
everything right below was learned from the sites' records. Held-out accuracy per site is the
demo's evaluator (`cli/demo/evaluate.py`) on that site's own held-out records; each line reports
the mean over the K sites and the worst site.

Every row trains with the product's code, in one process (no Flower processes): the agent's
`train_dp_lora` (DP-SGD with Poisson sampling, clipping 1.0, RDP accounting, FFA-LoRA) and the
coordinator's `aggregate`. At one epsilon per record:

* local-only DP: each site alone, rounds x steps DP-SGD steps on its own records;
* federated DP, one line per strategy (fedavg: plain LoRA, A and B averaged; ffa: FFA-LoRA,
  B averaged; fedadam: FFA-LoRA with the server's Adam, `--fedadam-lr`): `rounds` rounds of
  `steps` steps at every site. A job's epsilon is for all its rounds, so every round uses the
  noise `calibrate_composed_noise([], q, rounds x steps, eps)`, the same sigma as local-only:
  federation wins only by averaging K sites' noisy updates;
* ffa + personal: the ffa job, then `--personal-steps` local DP steps from the shared adapter at
  the sites whose own records are dominated by one label (majority share >= `--personal-share`;
  a site knows its own mix, nothing else; here it reads that share from its records without DP,
  a real site would set it from what it knows of its case mix). Those sites pay for both from
  the same epsilon: their rounds and personal steps share one sigma, calibrated over rounds x
  steps + personal steps (so their rounds are noisier than the others'). This is the federated
  recipe the goal is checked against; the line names the sites that personalised.
  `--personal-job fedadam` runs this job with the server's Adam instead of FFA's average (with
  `--site-optimizer sgd --site-lr 1 --site-momentum 0 --steps 1`: FedSGD, each round one noisy
  gradient per site, Adam at the coordinator); `--round-noise x` gives the personalising sites'
  rounds x times local-only's sigma and their personal steps what is left of the epsilon;
* centralized DP: the pooled records of all sites (a reference no consortium can run), the same
  steps at a K times larger batch (the same sample rate, so the same sigma) — the upper
  reference for what DP can learn from everyone's records;
* centralized non-private: the same without clipping and noise;
* bound (`--bound`): an optimistic bound on what a shared adapter plus personal steps can reach
  when every site adds its own noise (record-level DP at each site, DESIGN.md): the pooled
  records trained with the sites' noise averaged (sigma x sqrt(K) at the pooled batch: FedSGD
  without client drift), that adapter handed to every site for free, then `--personal-steps`
  personal steps paid with the site's WHOLE epsilon. A real federation pays for its rounds from
  the same epsilon and drifts between averages, so it stays below this line. Two rows: the
  pooled recipe's adapter + personal steps ("bound"), and per site the best of four models (the
  sites' and the pooled recipe, each with and without the personal steps; with the default
  recipes, both AdamW at `--lr`, two draws of the noise) chosen by accuracy on
  the site's own training records ("bound, best of 4"; that choice reads the records without DP,
  free here).

The same hyperparameters serve every row where they mean the same thing (rank, learning rate,
batch, total steps, clipping); they were tuned on K=3, n=64, alpha=10, epsilon=8. Local-only trains
FFA-LoRA like the jobs (plain LoRA was not better alone). 4 rounds of 10 steps, batch 32 (q = 0.5 at
n = 64, 0.125 at n = 256), 64 held-out records per site, the tiny base, Opacus' RDP analysis memoized
(`_memoize_rdp`), `--workers 2` processes of one thread each: the whole grid takes about 45 minutes
on 2 quiet cores (a K=8 setting about 8 minutes, a K=3 one about 2); `--sites 3 --records 64` about
5 minutes. `--server-lr` sets fedavg's and ffa's server learning rate (0: sqrt(K); measured worse than
1 at K=8). Each cell is one draw of data and noise (`--seed`): differences of a few points are
noise (local-only alone moves by up to 13 points between draws); `--seed 0 1 2` runs every
setting once per draw, one line each. `--site-optimizer sgd` trains the sites of every job with SGD
(`--site-lr`, `--site-momentum`) instead of AdamW, `--alone-optimizer sgd` the local-only row
(`--alone-lr`); the pooled references keep AdamW. SGD keeps each site's noisy update linear in its
gradients, so the coordinator's average cancels the sites' noise (see TrainConfig.optimizer); its
learning rate depends on the noise, AdamW's does not.

What it found (three draws per setting, `--records 64 --strategies ffa --bound --seed 0 1 2`; the
table is in docs/dp_lora.md "Does joining pay?"): with mild skew (alpha 10) federated + personal
beats going alone on average over the draws (+2 to +14 points; 8 of 12 draws); with strong skew
(alpha 0.3) it ties going alone at epsilon 8 (+1 on average) and loses at epsilon 2 (-3 at K=3, -7
at K=8). The ideal bound is above going alone in 22 of 24 draws. Earlier single draws (seed 0)
made alpha 10 look won in every setting: at epsilon 2, draws 1 and 2 go either way.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import statistics
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import torch

from fedtune.cli.demo.evaluate import Metrics, evaluate_records
from fedtune.cli.demo.run import build_base
from fedtune.cli.demo.sites import Site, hospital
from fedtune.client_agent.data import Record
from fedtune.client_agent.privacy import PrivacyConfig
from fedtune.client_agent.training import TrainConfig, train_dp_lora
from fedtune.compliance.accounting import Mechanism, calibrate_composed_noise, composed_epsilon
from fedtune.coordinator.aggregation import AggregationConfig, ClientUpdate, aggregate
from fedtune.model import load_pretrained
from fedtune.model.adapters import (
    DEFAULT_TARGET_MODULES,
    LoraSettings,
    adapter_state_dict,
    attach_lora,
    detach_lora,
    load_adapter_state,
)
from fedtune.model.tokenizer import load_tokenizer

DELTA = 1e-5
MAX_LEN = 48
STRATEGIES = ("fedavg", "ffa", "fedadam")
PLAIN_LORA = ("fedavg",)  # strategies that train and average A and B; the rest are FFA-LoRA (B only)


@dataclass(frozen=True)
class Setting:
    sites: int
    records: int
    alpha: float
    epsilon: float

    @property
    def name(self) -> str:
        return f"K={self.sites} n={self.records} alpha={self.alpha:g} eps={self.epsilon:g}"


@dataclass(frozen=True)
class Hyper:
    """Hyperparameters shared by every row where they mean the same thing (see the module docstring)."""

    rounds: int = 4
    steps: int = 10  # per round; local-only and centralized take rounds x steps
    batch_size: int = 32  # expected Poisson batch per site; centralized: sites x batch_size
    lr: float = 0.015
    rank: int = 8
    personal_steps: int = 20
    personal_share: float = 0.5
    personal_recipe: str = "site"  # the personal steps train with the sites' job recipe, or "alone"'s
    personal_job: str = "ffa"  # the strategy of the job the personal steps start from ("ffa" or "fedadam")
    round_noise: float = 0.0  # 0: a personalising site's rounds and personal steps share one sigma; x > 0: its
    # rounds use x times local-only's sigma and its personal steps what is left of the epsilon
    fedadam_lr: float = 0.01
    ffa_server_lr: float = 1.0  # server learning rate of fedavg / ffa; 0: sqrt(K)
    heldout: int = 64
    seed: int = 0
    # Optimizers (TrainConfig.optimizer): the sites in a job, a site alone (local-only), the pooled references.
    # "adamw" uses `lr`; "sgd" its own learning rate and momentum.
    site_optimizer: str = "adamw"
    site_lr: float = 0.05
    site_momentum: float = 0.9
    alone_optimizer: str = "adamw"
    alone_lr: float = 0.15

    def recipe(self, who: str) -> dict:
        """TrainConfig's optimizer, lr and momentum for ``who``: "site" (in a job), "alone" or "pooled"."""
        optimizer = {"site": self.site_optimizer, "alone": self.alone_optimizer}.get(who, "adamw")
        if optimizer == "adamw":
            return {"optimizer": "adamw", "lr": self.lr, "momentum": 0.0}
        if who == "site":
            return {"optimizer": "sgd", "lr": self.site_lr, "momentum": self.site_momentum}
        return {"optimizer": "sgd", "lr": self.alone_lr, "momentum": 0.0}

    @property
    def total_steps(self) -> int:
        return self.rounds * self.steps


def _memoize_rdp() -> None:
    """Opacus' RDP of one sampled Gaussian step is a pure function of (q, sigma, alpha); every
    `train_dp_lora` call accounts twice (its plan, its final epsilon), about 1.2 s of a 2-7 s call
    here, always for the same few (q, sigma). Memoizing it changes no number, only the wall time."""
    import functools

    from opacus.accountants.analysis import rdp

    if not hasattr(rdp._compute_rdp, "cache_info"):
        rdp._compute_rdp = functools.lru_cache(maxsize=None)(rdp._compute_rdp)


def label_mixes(sites: int, labels: int, alpha: float, rng: random.Random) -> list[tuple[float, ...]]:
    """Each site's label distribution, drawn from Dirichlet(alpha, ..., alpha)."""
    mixes = []
    for _ in range(sites):
        draws = [max(rng.gammavariate(alpha, 1.0), 1e-12) for _ in range(labels)]
        mixes.append(tuple(d / sum(draws) for d in draws))
    return mixes


@dataclass
class SiteData:
    site: Site
    train: list[Record]
    heldout: list[Record]

    def majority_share(self) -> float:
        """The share of this site's training records that carry its most frequent label (what it knows)."""
        counts = {}
        for r in self.train:
            counts[r.completion] = counts.get(r.completion, 0) + 1
        return max(counts.values()) / len(self.train)


def make_sites(setting: Setting, hp: Hyper) -> list[SiteData]:
    rng = random.Random(f"{hp.seed}/{setting.sites}/{setting.records}/{setting.alpha}")
    probe = hospital("a", (1.0, 1.0, 1.0))
    out = []
    for i, mix in enumerate(label_mixes(setting.sites, len(probe.labels), setting.alpha, rng)):
        site = dataclasses.replace(probe, client_id=f"site-{i}", label_mix=mix)
        train = [Record(**r) for r in site.records(setting.records, rng.randrange(2**31))]
        heldout = [Record(**r) for r in site.records(hp.heldout, rng.randrange(2**31))]
        out.append(SiteData(site, train, heldout))
    return out


@dataclass
class Lab:
    """The base, its tokenizer and the hyperparameters: train, aggregate and evaluate with the product's code."""

    base: torch.nn.Module
    tokenizer: object
    hp: Hyper

    def __post_init__(self) -> None:
        _memoize_rdp()

    def lora(self, ffa: bool) -> LoraSettings:
        return LoraSettings(rank=self.hp.rank, alpha=2.0 * self.hp.rank, ffa=ffa, target_modules=DEFAULT_TARGET_MODULES,
                            seed=self.hp.seed)

    def train(self, state: dict[str, torch.Tensor] | None, records: list[Record], *, steps: int, batch_size: int,
              sigma: float | None, epsilon: float, ffa: bool, seed: int, who: str) -> dict[str, torch.Tensor]:
        """`train_dp_lora` with noise multiplier ``sigma`` (None: no DP) and ``who``'s optimizer (Hyper.recipe); DP
        noise seeded (a benchmark, not secure)."""
        cfg = TrainConfig(batch_size=batch_size, physical_batch_size=batch_size, steps=steps, max_len=MAX_LEN,
                          seed=seed, **self.hp.recipe(who))
        privacy = (None if sigma is None else
                   PrivacyConfig(target_epsilon=epsilon, delta=DELTA, noise_multiplier=sigma, dp_seed=seed))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
            new, _ = train_dp_lora(self.base, state, records, cfg, privacy, self.lora(ffa), tokenizer=self.tokenizer)
        return new

    def initial(self, ffa: bool) -> dict[str, torch.Tensor]:
        """Version 0 of a job's adapter: A from the seed, B = 0 (FFA: B only)."""
        model = attach_lora(self.base, self.lora(ffa))
        try:
            return adapter_state_dict(model)
        finally:
            detach_lora(model)

    def evaluate(self, state: dict[str, torch.Tensor] | None, ffa: bool, sites: list[SiteData]) -> list[Metrics]:
        """Each site's held-out metrics with the adapter ``state`` (None: the base)."""
        labels = sites[0].site.labels
        if state is None:
            return [evaluate_records(self.base, self.tokenizer, s.heldout, labels) for s in sites]
        model = attach_lora(self.base, self.lora(ffa))
        try:
            load_adapter_state(model, state)
            return [evaluate_records(model, self.tokenizer, s.heldout, labels) for s in sites]
        finally:
            detach_lora(model)


def _seed(*parts) -> int:
    return hash(tuple(parts)) & 0x7FFFFFFF  # str hashing is salted per process: only ints go in here


def run_federated(lab: Lab, sites: list[SiteData], strategy: str, sigmas: list[float], epsilon: float,
                  salt: int) -> dict[str, torch.Tensor]:
    """A job of ``lab.hp.rounds`` rounds: every site trains from the current adapter with its own
    noise multiplier, then the coordinator's ``aggregate`` (weights = records); returns the last version."""
    hp = lab.hp
    ffa = strategy not in PLAIN_LORA
    current = lab.initial(ffa)
    server_state = None
    server_lr = hp.fedadam_lr if strategy == "fedadam" else (hp.ffa_server_lr or len(sites) ** 0.5)
    config = AggregationConfig(method=strategy, server_lr=server_lr)
    for r in range(hp.rounds):
        updates = [ClientUpdate(s.site.client_id,
                                lab.train(current, s.train, steps=hp.steps, batch_size=hp.batch_size, sigma=sigma,
                                          epsilon=epsilon, ffa=ffa, seed=_seed(salt, r, i), who="site"),
                                float(len(s.train)))
                   for i, (s, sigma) in enumerate(zip(sites, sigmas, strict=True))]
        result = aggregate(updates, current=current, config=config, server_state=server_state)
        current, server_state = result.tensors, result.server_state
    return current


def run_setting(lab: Lab, setting: Setting, strategies: list[str], log, bound: bool = False) -> dict:
    """Every row of one setting (``bound``: with the `--bound` row); returns what the JSON holds for it."""
    hp = lab.hp
    sites = make_sites(setting, hp)
    q = hp.batch_size / setting.records
    total = hp.total_steps
    sigma = calibrate_composed_noise([], sample_rate=q, steps=total, epsilon=setting.epsilon, delta=DELTA)
    if hp.round_noise:
        sigma_rounds = sigma * hp.round_noise
        sigma_personal = calibrate_composed_noise([Mechanism(q, sigma_rounds, total)], sample_rate=q,
                                                  steps=hp.personal_steps, epsilon=setting.epsilon, delta=DELTA)
    else:
        sigma_personal = calibrate_composed_noise([], sample_rate=q, steps=total + hp.personal_steps,
                                                  epsilon=setting.epsilon, delta=DELTA)
        sigma_rounds = sigma_personal
    personal = [s.majority_share() >= hp.personal_share for s in sites]
    out = {"setting": dataclasses.asdict(setting), "sample_rate": q, "sigma": sigma,
           "sigma_rounds": sigma_rounds, "sigma_personal": sigma_personal,
           "epsilon_spent": {
               "local_or_federated": composed_epsilon([Mechanism(q, sigma, total)], DELTA),
               "personalised": composed_epsilon([Mechanism(q, sigma_rounds, total),
                                                 Mechanism(q, sigma_personal, hp.personal_steps)], DELTA)},
           "label_mixes": [list(s.site.label_mix) for s in sites],
           "majority_share": [s.majority_share() for s in sites],
           "personalised_sites": [i for i, p in enumerate(personal) if p], "rows": {}}
    salt = hp.seed * 7919 + setting.sites * 31 + setting.records

    def row(name: str, metrics: list[Metrics], started: float, note: str = "") -> None:
        acc = [m.accuracy for m in metrics]
        out["rows"][name] = {"accuracy": acc, "loss": [m.loss for m in metrics], "mean": statistics.mean(acc),
                             "worst": min(acc), "seconds": round(time.perf_counter() - started, 1), "note": note}
        log(f"  {name:<24} mean {statistics.mean(acc):6.1%}  worst {min(acc):6.1%}  "
            f"({time.perf_counter() - started:.0f} s){'  ' + note if note else ''}")

    t = time.perf_counter()
    row("base", lab.evaluate(None, True, sites), t)
    t = time.perf_counter()
    row("local-only DP", [lab.evaluate(lab.train(None, s.train, steps=total, batch_size=hp.batch_size, sigma=sigma,
                                                 epsilon=setting.epsilon, ffa=True, seed=_seed(salt, 1, i),
                                                 who="alone"),
                                       True, [s])[0] for i, s in enumerate(sites)], t)
    for strategy in strategies:
        t = time.perf_counter()
        if strategy != PERSONAL_SLOT:
            state = run_federated(lab, sites, strategy, [sigma] * len(sites), setting.epsilon, _seed(salt, 2, 0))
            row(f"federated DP {strategy}", lab.evaluate(state, strategy not in PLAIN_LORA, sites), t)
            continue
        sigmas = [sigma_rounds if p else sigma for p in personal]
        state = run_federated(lab, sites, hp.personal_job, sigmas, setting.epsilon, _seed(salt, 3, 0))
        shared = lab.evaluate(state, True, sites)
        row(f"federated DP {hp.personal_job}", shared, t)
        t = time.perf_counter()
        mixed = [lab.evaluate(lab.train(state, s.train, steps=hp.personal_steps, batch_size=hp.batch_size,
                                        sigma=sigma_personal, epsilon=setting.epsilon, ffa=True,
                                        seed=_seed(salt, 4, i), who=hp.personal_recipe), True, [s])[0] if p else m
                 for i, (s, p, m) in enumerate(zip(sites, personal, shared, strict=True))]
        row(f"federated DP {hp.personal_job}+personal", mixed, t,
            f"personalised: {', '.join(str(i) for i, p in enumerate(personal) if p) or 'none'}")
    pooled = [r for s in sites for r in s.train]
    for private in (True, False):
        t = time.perf_counter()
        state = lab.train(None, pooled, steps=total, batch_size=hp.batch_size * setting.sites,
                          sigma=sigma if private else None, epsilon=setting.epsilon, ffa=True, seed=_seed(salt, 5),
                          who="pooled")
        row(f"centralized {'DP' if private else 'non-private'}", lab.evaluate(state, True, sites), t)
    if bound:
        t = time.perf_counter()
        plain, best = personalised_bound(lab, setting, sites, sigma, salt)
        row(BOUND_ROW, plain, t)
        row(BEST_BOUND_ROW, best, t)
    return out


def personalised_bound(lab: Lab, setting: Setting, sites: list[SiteData], sigma: float,
                       salt: int) -> tuple[list[Metrics], list[Metrics]]:
    """Per site, the optimistic bounds of the module docstring (`--bound`): (the ideal federation's adapter with
    the pooled recipe + personal steps at the site's whole epsilon, the best of four such models by accuracy on
    the site's training records; never on the held-out ones, which would add the best of four noisy draws)."""
    hp = lab.hp
    pooled = [r for s in sites for r in s.train]
    q = hp.batch_size / setting.records
    sigma_personal = calibrate_composed_noise([], sample_rate=q, steps=hp.personal_steps, epsilon=setting.epsilon,
                                              delta=DELTA)
    on_train = [dataclasses.replace(site, heldout=site.train) for site in sites]
    plain: list[Metrics] = []
    best: list[tuple[float, Metrics] | None] = [None] * len(sites)
    for k, who in enumerate(("site", "pooled")):
        state = lab.train(None, pooled, steps=hp.total_steps, batch_size=hp.batch_size * setting.sites,
                          sigma=sigma * setting.sites ** 0.5, epsilon=setting.epsilon, ffa=True,
                          seed=_seed(salt, 6, k), who=who)
        for i, (site, train) in enumerate(zip(sites, on_train, strict=True)):
            personal = lab.train(state, site.train, steps=hp.personal_steps, batch_size=hp.batch_size,
                                 sigma=sigma_personal, epsilon=setting.epsilon, ffa=True, seed=_seed(salt, 7, k, i),
                                 who="alone")
            for candidate in (state, personal):
                metrics = lab.evaluate(candidate, True, [site])[0]
                if who == "pooled" and candidate is personal:
                    plain.append(metrics)
                chosen_by = lab.evaluate(candidate, True, [train])[0].accuracy
                if best[i] is None or chosen_by > best[i][0]:
                    best[i] = (chosen_by, metrics)
    return plain, [metrics for _, metrics in best]


def _worker_lab(hp: Hyper, threads: int) -> Lab:
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        path, _ = build_base(Path(tmp))
        return Lab(load_pretrained(path), load_tokenizer(path), hp)


_LAB: Lab | None = None


def _run_in_worker(hp: Hyper, threads: int, setting: Setting, strategies: list[str],
                   bound: bool) -> tuple[dict, list[str]]:
    global _LAB
    if _LAB is None:
        _LAB = _worker_lab(hp, threads)
    elif _LAB.hp != hp:  # the base does not depend on the hyperparameters
        _LAB = Lab(_LAB.base, _LAB.tokenizer, hp)
    lines: list[str] = []
    started = time.perf_counter()
    result = run_setting(_LAB, setting, strategies, lines.append, bound)
    result["seed"] = hp.seed
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result, lines


PERSONAL_SLOT = "ffa"  # the strategy whose line runs the job with personal steps (Hyper.personal_job)
BOUND_ROW = "bound: ideal federation + personal"
BEST_BOUND_ROW = "bound, best of 4"


def markdown_table(results: list[dict], strategies: list[str], personal_job: str = "ffa") -> str:
    """One line per setting: mean / worst held-out accuracy of every row."""
    fed_rows = [f"federated DP {s}" for s in strategies if s != PERSONAL_SLOT]
    fed_recipe = f"federated DP {personal_job}+personal"  # what the goal is checked against
    if PERSONAL_SLOT in strategies:
        fed_rows += [f"federated DP {personal_job}", fed_recipe]
    bound = any(BOUND_ROW in res["rows"] for res in results)
    cols = ["local-only DP", *fed_rows, "centralized DP", "centralized non-private",
            *([BOUND_ROW, BEST_BOUND_ROW] if bound else [])]
    short = {"local-only DP": "local DP", "centralized DP": "central DP", "centralized non-private": "central non-DP",
             fed_recipe: f"{personal_job}+personal (sites)", BOUND_ROW: "bound"}
    seeds = len({res.get("seed") for res in results}) > 1
    header = ["K", "n", "alpha", "eps", *(["seed"] if seeds else []), "base",
              *[short.get(c, c.removeprefix("federated DP ")) for c in cols]]
    if fed_recipe in fed_rows:
        header.append("fed >= local")
    if bound:
        header += ["bound >= local", "best of 4 >= local"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for res in results:
        s, rows = res["setting"], res["rows"]
        cells = [str(s["sites"]), str(s["records"]), f"{s['alpha']:g}", f"{s['epsilon']:g}",
                 *([str(res.get("seed"))] if seeds else []), f"{rows['base']['mean']:.0%}"]
        for col in cols:
            cell = f"{rows[col]['mean']:.0%} / {rows[col]['worst']:.0%}"
            if col == fed_recipe:
                cell += f" ({','.join(map(str, res['personalised_sites'])) or '-'})"
            cells.append(cell)
        if fed_recipe in fed_rows:
            cells.append("yes" if rows[fed_recipe]["mean"] >= rows["local-only DP"]["mean"] else "**no**")
        if bound:
            cells += ["yes" if rows[r]["mean"] >= rows["local-only DP"]["mean"] else "**no**"
                      for r in (BOUND_ROW, BEST_BOUND_ROW)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", type=int, nargs="+", default=[3, 8], help="sites K (default: 3 8)")
    parser.add_argument("--records", type=int, nargs="+", default=[64, 256], help="training records per site")
    parser.add_argument("--alpha", type=float, nargs="+", default=[0.3, 10.0], help="Dirichlet label skew")
    parser.add_argument("--epsilon", type=float, nargs="+", default=[2.0, 8.0], help="epsilon per record")
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    parser.add_argument("--rounds", type=int, default=Hyper.rounds)
    parser.add_argument("--steps", type=int, default=Hyper.steps, help="DP-SGD steps per round at each site")
    parser.add_argument("--batch-size", type=int, default=Hyper.batch_size, help="expected batch per site")
    parser.add_argument("--lr", type=float, default=Hyper.lr, help="AdamW learning rate of every training run")
    parser.add_argument("--rank", type=int, default=Hyper.rank, help="LoRA rank")
    parser.add_argument("--personal-steps", type=int, default=Hyper.personal_steps)
    parser.add_argument("--personal-share", type=float, default=Hyper.personal_share,
                        help="a site personalises when its majority label has at least this share of its records")
    parser.add_argument("--personal-recipe", choices=("site", "alone"), default=Hyper.personal_recipe,
                        help="the personal steps' optimizer: the sites' in the job, or a site's alone")
    parser.add_argument("--personal-job", choices=("ffa", "fedadam"), default=Hyper.personal_job,
                        help="the strategy of the job whose adapter the personal steps start from (run in ffa's line)")
    parser.add_argument("--round-noise", type=float, default=Hyper.round_noise,
                        help="a personalising site's rounds at this multiple of local-only's sigma, its personal "
                             "steps at what is left of the epsilon (default 0: one sigma for both)")
    parser.add_argument("--fedadam-lr", type=float, default=Hyper.fedadam_lr, help="fedadam's server learning rate")
    parser.add_argument("--server-lr", type=float, default=Hyper.ffa_server_lr,
                        help="fedavg's and ffa's server learning rate (0: sqrt of the number of sites)")
    parser.add_argument("--site-optimizer", choices=("adamw", "sgd"), default=Hyper.site_optimizer,
                        help="the sites' optimizer in the federated jobs (adamw uses --lr)")
    parser.add_argument("--site-lr", type=float, default=Hyper.site_lr, help="their SGD learning rate")
    parser.add_argument("--site-momentum", type=float, default=Hyper.site_momentum, help="their SGD momentum")
    parser.add_argument("--alone-optimizer", choices=("adamw", "sgd"), default=Hyper.alone_optimizer,
                        help="a site's optimizer alone (local-only; adamw uses --lr)")
    parser.add_argument("--alone-lr", type=float, default=Hyper.alone_lr, help="its SGD learning rate (no momentum)")
    parser.add_argument("--heldout", type=int, default=Hyper.heldout, help="held-out records per site")
    parser.add_argument("--seed", type=int, nargs="+", default=[0],
                        help="draws of data and DP noise: every setting once per seed (default: 0)")
    parser.add_argument("--bound", action="store_true",
                        help="add the optimistic bound of any shared adapter + personal steps (module docstring)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 rounds of 4 steps, 24 held-out records")
    parser.add_argument("--workers", type=int, default=2, help="processes, one setting each at a time")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--json", type=Path, help="write every number (per site) here")
    args = parser.parse_args()
    hp = Hyper(rounds=args.rounds, steps=args.steps, batch_size=args.batch_size, lr=args.lr, rank=args.rank,
               personal_steps=args.personal_steps, personal_share=args.personal_share,
               personal_recipe=args.personal_recipe, personal_job=args.personal_job, round_noise=args.round_noise,
               fedadam_lr=args.fedadam_lr,
               ffa_server_lr=args.server_lr, site_optimizer=args.site_optimizer, site_lr=args.site_lr,
               site_momentum=args.site_momentum, alone_optimizer=args.alone_optimizer, alone_lr=args.alone_lr,
               heldout=args.heldout, seed=args.seed[0])
    if args.quick:
        hp = dataclasses.replace(hp, rounds=2, steps=4, personal_steps=4, heldout=24)
    if args.personal_job != PERSONAL_SLOT and args.personal_job in args.strategies:
        parser.error(f"--personal-job {args.personal_job} runs in {PERSONAL_SLOT}'s line; leave {args.personal_job} "
                     f"out of --strategies")
    bad = [s for s in args.records if s < hp.batch_size]
    if bad:
        parser.error(f"--records {bad} cannot fill the expected batch of {hp.batch_size}; lower --batch-size")
    settings = [Setting(k, n, alpha, eps) for k in args.sites for n in args.records for alpha in args.alpha
                for eps in args.epsilon]
    settings.sort(key=lambda s: -s.sites * s.records)  # the longest first: workers finish together
    runs = [(seed, setting) for setting in settings for seed in args.seed]
    print(f"{len(settings)} settings x {len(args.seed)} seed(s), {hp}; {args.workers} worker(s) x {args.threads} "
          f"thread(s)", flush=True)
    started = time.perf_counter()
    results = []
    ctx = get_context("spawn")
    with ProcessPoolExecutor(max_workers=args.workers, mp_context=ctx) as pool:
        futures = [pool.submit(_run_in_worker, dataclasses.replace(hp, seed=seed), args.threads, setting,
                               args.strategies, args.bound) for seed, setting in runs]
        for done, ((seed, setting), future) in enumerate(zip(runs, futures, strict=True), start=1):
            result, lines = future.result()
            results.append(result)
            print(f"[{done}/{len(runs)}] {setting.name} seed {seed}: {result['seconds']:.0f} s, "
                  f"sigma {result['sigma']:.3f} "
                  f"(personalising sites: rounds {result['sigma_rounds']:.3f}, personal steps "
                  f"{result['sigma_personal']:.3f}), q {result['sample_rate']:.3g}, "
                  f"{time.perf_counter() - started:.0f} s elapsed", flush=True)
            print("\n".join(lines), flush=True)
    wall = time.perf_counter() - started
    order = {s: i for i, s in enumerate(sorted(settings, key=lambda s: (s.sites, s.records, s.alpha, s.epsilon)))}
    results.sort(key=lambda r: (order[Setting(**r["setting"])], r["seed"]))
    print(f"\nheld-out accuracy, mean over sites / worst site ({wall:.0f} s wall, {hp.rounds} rounds x "
          f"{hp.steps} steps, batch {hp.batch_size}, rank {hp.rank}; sites in a job {hp.recipe('site')}, a site "
          f"alone {hp.recipe('alone')}, pooled {hp.recipe('pooled')}):\n")
    print(markdown_table(results, args.strategies, hp.personal_job))
    if args.json:
        args.json.write_text(json.dumps({"hyperparameters": dataclasses.asdict(hp), "wall_seconds": round(wall, 1),
                                         "settings": results}, indent=2) + "\n")
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
