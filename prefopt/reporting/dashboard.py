"""A W&B report (or saved workspace view) that compares one group's runs on the DCR metrics.

    python -m prefopt.wandb_dashboard ENTITY/PROJECT GROUP                  # a report; prints its URL
    python -m prefopt.wandb_dashboard ENTITY/PROJECT GROUP --kind workspace # a saved workspace view
    python -m prefopt.wandb_dashboard ENTITY/PROJECT GROUP --dry-run        # build it, print it, save nothing

Needs the optional `wandb-workspaces` package (`pip install wandb-workspaces`) and a W&B login. The group is
the sweep's name (`logger.wandb.group`, by default the multirun directory's name); every chart plots against
the optimizer step (`step`, see `prefopt.tracking`).
"""

from __future__ import annotations

from typing import Any

# (section, [(chart title, [metrics])]): line charts against the optimizer step.
SECTIONS = [
    (
        "Rewards (DCR: the chosen reward falling below zero)",
        [
            ("chosen reward", ["train/rewards/chosen", "eval/rewards/chosen"]),
            ("rejected reward", ["train/rewards/rejected", "eval/rewards/rejected"]),
            ("margin", ["train/rewards/margins", "eval/rewards/margins"]),
        ],
    ),
    (
        "Degraded chosen responses",
        [
            (
                "share of pairs with chosen reward < 0",
                ["train/dcr/chosen_reward_below_zero", "eval/dcr/chosen_reward_below_zero"],
            ),
            (
                "chosen log-prob change per token",
                ["train/dcr/chosen_logp_delta_per_token", "eval/dcr/chosen_logp_delta_per_token"],
            ),
            (
                "rejected log-prob change per token",
                ["train/dcr/rejected_logp_delta_per_token", "eval/dcr/rejected_logp_delta_per_token"],
            ),
            ("chosen log-prob", ["train/logps/chosen", "eval/logps/chosen"]),
        ],
    ),
    (
        "Loss and preference accuracy",
        [
            ("loss", ["train/loss", "eval/loss"]),
            ("reward accuracy", ["train/rewards/accuracies", "eval/rewards/accuracies"]),
            ("gradient norm", ["train/grad_norm"]),
        ],
    ),
]
# Bars over the runs' summaries: accuracy on the verified benchmarks after and before preference training.
VERIFIED_BARS = [("verified accuracy (mean)", ["eval/verified/mean", "eval/verified_before/mean"])]


def group_filter(group: str) -> str:
    return f"Metric('Group') == {group!r}"


def _panels(wr: Any, charts: list[tuple[str, list[str]]]) -> list[Any]:
    return [wr.LinePlot(title=title, x="step", y=list(metrics)) for title, metrics in charts]


def build_report(wr: Any, entity: str, project: str, group: str, title: str | None = None) -> Any:
    """A `wandb_workspaces.reports.v2.Report`: one panel grid per section, each over the group's runs."""
    runset = lambda: wr.Runset(entity=entity, project=project, name=group, filters=group_filter(group))  # noqa: E731
    blocks: list[Any] = [
        wr.P(
            f"Runs of group {group}: rewards are β·log(π/π_ref) of the completions; a chosen reward below zero "
            "means the policy made the preferred answer less likely than the reference did (DCR)."
        ),
    ]
    for section, charts in SECTIONS:
        blocks += [wr.H2(section), wr.PanelGrid(runsets=[runset()], panels=_panels(wr, charts))]
    bars = [wr.BarPlot(title=t, metrics=list(m)) for t, m in VERIFIED_BARS] + [wr.RunComparer(diff_only="split")]
    blocks += [wr.H2("Verified accuracy and what differs between runs"), wr.PanelGrid(runsets=[runset()], panels=bars)]
    return wr.Report(
        entity=entity,
        project=project,
        title=title or f"DCR: {group}",
        description=f"prefopt sweep {group}: rewards, DCR metrics and verified accuracy",
        blocks=blocks,
    )


def build_workspace(ws: Any, wr: Any, entity: str, project: str, group: str, title: str | None = None) -> Any:
    """A saved workspace view of the project, filtered to the group, with the same charts as the report."""
    sections = [ws.Section(name=name, panels=_panels(wr, charts), is_open=True) for name, charts in SECTIONS]
    sections.append(
        ws.Section(
            name="Verified accuracy",
            is_open=True,
            panels=[wr.BarPlot(title=t, metrics=list(m)) for t, m in VERIFIED_BARS],
        )
    )
    return ws.Workspace(
        name=title or f"DCR {group}",
        entity=entity,
        project=project,
        sections=sections,
        runset_settings=ws.RunsetSettings(filters=group_filter(group)),
    )
