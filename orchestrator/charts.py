"""Pictures of a run and of its memory plan, as matplotlib Figures (the UI shows them, the CLI saves PNGs).

- `memory_chart(plan)`: per device (RAM, each GPU, the budget), one stacked bar per wave of every stage:
  what its servers need in weights, KV cache, compute and the rest, against the memory usable now (free
  minus the margin) and the free memory.
- `timeline_chart(run)`: one bar per model call (synthesis calls included), stage by stage, from its start
  to its end, with its tokens/s.

Library code: plain `matplotlib.figure.Figure` objects on the Agg canvas, never pyplot's global state, so
charts made on several threads (Streamlit sessions) do not share anything. Each drawn bar carries a gid
(`call:<step>:<label>`, `mem:<device>:<stage>:<wave>:<part>`) so a reader, a test, can tell what it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle

from launcher.errors import ChorusError
from orchestrator.history.serialize import Session
from orchestrator.plan.memory import PARTS, MemoryPlan, ServerNeed, StageMemory
from orchestrator.records import ResponseRecord, RunRecord, RunStatus, response_from_dict
from orchestrator.units import GiB, MiB

PART_LABELS = {"weights": "weights", "kv": "KV cache", "compute": "compute", "other": "process & buffers"}
PART_COLORS = {"weights": "#4C72B0", "kv": "#DD8452", "compute": "#55A868", "other": "#8C8C8C"}
STAGE_COLORS = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C",
                "#CCB974", "#64B5CD"]
FAILED_COLOR = "#C44E52"


class ChartError(ChorusError):
    """A chart could not be written to its file."""

    def __init__(self, path: str | Path, message: str, *, hint: str | None = None) -> None:
        super().__init__(f"{path}: {message}", hint=hint)
        self.path = str(path)
        self.detail = message


def new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)  # the Agg canvas, whatever backend pyplot would pick
    return fig


def save_png(fig: Figure, path: str | Path) -> Path:
    """Write `fig` as a PNG file at `path` (ChartError with the reason when it cannot)."""
    path = Path(path)
    try:
        fig.savefig(path, format="png", dpi=110)
    except OSError as exc:
        raise ChartError(path, f"cannot write the PNG ({exc.strerror or exc})",
                         hint="Check that the folder exists and is writable.") from None
    return path


def _scale(most: float) -> tuple[float, str]:
    return (GiB, "GiB") if most >= 2 * GiB else (MiB, "MiB")


# ---------------------------------------------------------------- memory plan


@dataclass
class _Column:
    """One bar position: a wave of a stage (or its synthesis) and the servers it starts."""

    stage: str
    wave: str          # '1', '2'... or 'synthesis'
    labels: list[str]
    servers: list[ServerNeed]
    running: int = 0   # servers already running that it reuses (they need nothing new)


def memory_columns(plan: MemoryPlan) -> list[_Column]:
    """Every wave of every stage, then its synthesis, with the servers each one starts or reuses (the
    slots the scheduler decided for that wave)."""
    columns: list[_Column] = []
    for stage in plan.stages:
        for i, wave in enumerate(stage.detail, 1):
            columns.append(_column(stage, str(i), list(wave.labels), list(wave.servers)))
        syn, syn_wave = stage.synthesis, stage.synthesis_wave
        if syn is not None and syn_wave is not None and not syn.remote and syn.source != "unavailable":
            columns.append(_column(stage, "synthesis", list(syn_wave.labels), list(syn_wave.servers)))
    return columns


def _column(stage: StageMemory, wave: str, labels: list[str], servers: list[ServerNeed]) -> _Column:
    local = [s for s in servers if not s.remote and s.source != "unavailable"]
    return _Column(stage.stage, wave, labels, [s for s in local if not s.reused], sum(s.reused for s in local))


def column_parts(column: _Column, device: str) -> dict[str, int]:
    """What a wave's new servers need on `device`, by part. A file's mapped weights count once in RAM (its
    servers share the page cache); on the budget each server counts its whole footprint."""
    parts = dict.fromkeys(PARTS, 0)
    seen: set[str] = set()
    for server in column.servers:
        devices = [d for d in server.breakdown if d != "budget"] if device == "budget" else [device]
        for d in devices:
            for part, n in server.breakdown.get(d, {}).items():
                parts[part] += n
        if device == "ram" and server.name in seen:
            parts["weights"] -= min(server.mapped_bytes, parts["weights"])
        seen.add(server.name)
    return parts


def chart_devices(plan: MemoryPlan) -> list[str]:
    """The devices to draw: RAM, each GPU a server uses or that is usable, and the budget when one is set."""
    devices = {d for s in plan.stages for m in [*s.models, *([s.synthesis] if s.synthesis else [])]
               for d in m.breakdown}
    devices |= set(plan.available.free)
    return sorted(devices, key=lambda d: (d != "ram", d == "budget", d))


def memory_chart(plan: MemoryPlan) -> Figure:
    """Per device, one stacked bar per wave: weights, KV cache, compute, the rest; lines at the memory usable
    now and the memory free."""
    columns = memory_columns(plan)
    devices = chart_devices(plan)
    width = max(6.0, 1.3 * len(columns) + 2.5)
    fig = new_figure(width, 3.2 * len(devices) + 0.6)
    axes = fig.subplots(len(devices), 1, squeeze=False)[:, 0]
    usable, free = plan.available.have(), plan.available.free
    sources = sorted({m.source for c in columns for m in c.servers})
    measured = " (measured, split as the estimate's parts)" if "calibrated" in sources else ""
    fig.suptitle(f"Memory plan of '{plan.pipeline}'" + ("" if plan.fits else " — does NOT fit")
                 + (f"\nfigures: {', '.join(sources)}{measured}" if sources else ""), fontsize=11)
    for ax, device in zip(axes, devices, strict=True):
        heights = [column_parts(c, device) for c in columns]
        totals = [sum(h.values()) for h in heights]
        limit, free_now = usable.get(device), free.get(device)
        lines = [(n, name, style) for n, name, style in ((limit, "usable now", "-"), (free_now, "free", "--"))
                 if n is not None and not (name == "free" and n == limit)]
        tallest = max(totals, default=0)
        # memory far above the bars would flatten them: such a line is written in the corner instead
        shown = [ln for ln in lines if not tallest or ln[0] <= 4 * tallest]
        unit, unit_name = _scale(max([tallest, *(n for n, _, _ in shown), 1]))
        xs = list(range(len(columns)))
        bottom = [0.0] * len(columns)
        for part in PARTS:
            values = [h[part] / unit for h in heights]
            if not any(values):
                continue
            bars = ax.bar(xs, values, bottom=bottom, color=PART_COLORS[part], label=PART_LABELS[part], width=0.6)
            for bar, column in zip(bars, columns, strict=True):
                bar.set_gid(f"mem:{device}:{column.stage}:{column.wave}:{part}")
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
        for x, total in zip(xs, totals, strict=True):
            over = limit is not None and total > limit
            ax.annotate(_fmt(total / unit, unit_name) + (" (over)" if over else ""), (x, total / unit),
                        ha="center", va="bottom", fontsize=8, color=FAILED_COLOR if over else "black",
                        xytext=(0, 2), textcoords="offset points")
        for n, name, style in shown:
            ax.axhline(n / unit, color="black", linewidth=1.2, linestyle=style, label=f"{name} {_fmt_bytes(n)}")
        far = [f"{name} {_fmt_bytes(n)}" for n, name, _ in lines if (n, name, _) not in shown]
        if far:
            ax.text(0.99, 0.97, "off the scale: " + ", ".join(far), ha="right", va="top", fontsize=8,
                    transform=ax.transAxes)
        ax.set_xticks(xs, [_column_label(c) for c in columns], fontsize=8)
        ax.set_ylabel(unit_name)
        ax.set_title(_device_title(device, plan), fontsize=10, loc="left")
        ax.set_ylim(0, max([tallest * 1.35, *(n * 1.08 for n, _, _ in shown), 1]) / unit)
        if columns:
            handles, names = ax.get_legend_handles_labels()
            order = sorted(range(len(names)), key=lambda i: names[i] not in PART_LABELS.values())  # parts first
            ax.legend([handles[i] for i in order], [names[i] for i in order], fontsize=7, loc="upper left",
                      bbox_to_anchor=(1.0, 1.0))
        else:
            ax.text(0.5, 0.5, "no local model to load", ha="center", va="center", transform=ax.transAxes)
    return fig


def _column_label(c: _Column) -> str:
    head = f"{c.stage}" + ("" if c.wave == "1" else f" · {c.wave}" if c.wave == "synthesis" else f" · wave {c.wave}")
    labels = ", ".join(c.labels)
    if len(labels) > 28:
        labels = labels[:27] + "…"
    running = f"\n(+{c.running} running)" if c.running else ""
    return f"{head}\n{labels}{running}"


def _device_title(device: str, plan: MemoryPlan) -> str:
    names = {"ram": "RAM", "budget": "memory budget (RAM + VRAM of every server)"}
    note = plan.available.notes.get(device)
    return names.get(device, device.upper()) + (f" — {note}" if note else "")


def _fmt_bytes(n: int) -> str:
    return _fmt(n / GiB, "GiB") if n >= 2 * GiB else _fmt(n / MiB, "MiB")


def _fmt(value: float, unit: str) -> str:
    return f"{value:.2f} {unit}" if unit == "GiB" else f"{value:.0f} {unit}"


# ---------------------------------------------------------------- run timeline


@dataclass
class _Call:
    step: int
    stage: str
    call: ResponseRecord
    synthesis: bool = False

    @property
    def name(self) -> str:
        kind = "synthesis: " if self.synthesis else ""
        model = "" if self.call.label == self.call.model else f" ({self.call.model})"
        return f"{self.step}. {kind}{self.call.label}{model}"


def timeline_calls(run: RunRecord) -> list[_Call]:
    """Every model call of the run in order: each stage's calls, then its synthesis calls (kept in the
    aggregation's details). Stages copied from a parent session are left out: they ran in another run."""
    calls: list[_Call] = []
    for stage in run.stages:
        if stage.status == "copied":
            continue
        calls.extend(_Call(stage.index, stage.name, r) for r in stage.responses)
        details = stage.aggregation.details if stage.aggregation is not None else {}
        for i, data in enumerate(details.get("synthesis_calls") or []):
            try:
                calls.append(_Call(stage.index, stage.name, response_from_dict(data, where=f"synthesis {i + 1}"),
                                   synthesis=True))
            except ChorusError:
                continue  # a damaged entry: the rest of the timeline still shows
    return calls


def timeline_origin(run: RunRecord, calls: list[_Call]) -> float:
    """Time 0 of the timeline: when the first step of this run (or its first call) started; a run and its
    saved session give the same one."""
    starts = [s.started_at for s in run.stages if s.status != "copied" and s.started_at is not None]
    starts += [c.call.started_at for c in calls if c.call.started_at is not None]
    return min(starts, default=run.started_at or 0.0)


def timeline_chart(run: RunRecord | Session) -> Figure:
    """One horizontal bar per model call, from its start to its end (seconds since the run started), coloured
    by stage, with its tokens/s; a failed call is hatched and says why it has no speed."""
    record = _run_of(run) if isinstance(run, Session) else run
    calls = timeline_calls(record)
    fig = new_figure(9.0, 1.4 + 0.42 * max(1, len(calls)))
    ax = fig.subplots()
    t0 = timeline_origin(record, calls)
    colors: dict[int, str] = {}
    for row, c in enumerate(calls):
        color = colors.setdefault(c.step, STAGE_COLORS[len(colors) % len(STAGE_COLORS)])
        r = c.call
        if r.started_at is None:
            ax.text(0, row, f"  {r.status}, not timed", va="center", fontsize=8, color="dimgray")
            continue
        end = r.finished_at if r.finished_at is not None else r.started_at + (r.total_s or 0.0)
        failed = r.status != "ok"
        (bar,) = ax.barh(row, max(end - r.started_at, 1e-3), left=r.started_at - t0, height=0.6, color=color,
                         edgecolor=FAILED_COLOR if failed else color, hatch="//" if failed else None,
                         alpha=0.55 if c.synthesis else 1.0)
        bar.set_gid(f"call:{c.step}:{r.label}" + (":synthesis" if c.synthesis else ""))
        ax.annotate(_call_note(r), (end - t0, row), xytext=(4, 0), textcoords="offset points", va="center",
                    fontsize=8, color=FAILED_COLOR if failed else "black")
    ax.set_yticks(range(len(calls)), [c.name for c in calls], fontsize=8)
    ax.invert_yaxis()  # first call on top
    ax.set_xlabel("seconds since the first step started")
    ends = [c.call.finished_at or c.call.started_at or 0.0 for c in calls if c.call.started_at is not None]
    ax.set_xlim(0, max([(e - t0) * 1.3 for e in ends] + [1.0]))
    status = record.status
    ax.set_title(f"Run timeline — {status}" + _copied_note(record), fontsize=10, loc="left")
    seen: dict[int, str] = {}
    for c in calls:
        seen.setdefault(c.step, c.stage)
    ax.legend(handles=[Patch(color=colors[s], label=f"{s}. {name}") for s, name in seen.items() if s in colors],
              fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0), title="stage", title_fontsize=7)
    if not calls:
        ax.text(0.5, 0.5, "no model call recorded", ha="center", va="center", transform=ax.transAxes)
    return fig


def _run_of(session: Session) -> RunRecord:
    """The session's run as the timeline needs it; built directly (not through the strict loader) so a
    damaged session.json still gives the timeline of the stages that could be read."""
    m = session.meta
    created = m.get("created_at")
    return RunRecord(question=m.get("question") or "", mode=m.get("mode") or "manual", pipeline={},
                     stages=list(session.stages), status=cast(RunStatus, m.get("status") or "unknown"),
                     started_at=created if isinstance(created, int | float) else 0.0,
                     parent_session=m.get("parent_session"))


def _call_note(r: ResponseRecord) -> str:
    seconds = r.total_s if r.total_s is not None else (
        r.finished_at - r.started_at if r.finished_at is not None and r.started_at is not None else None)
    took = f" in {seconds:.1f}s" if seconds is not None else ""
    if r.status != "ok":
        return f"{r.status}{took}"
    speed = f"{r.tokens_per_s:.1f} tok/s" if r.tokens_per_s else "– tok/s"
    tokens = f", {r.completion_tokens} tokens" if r.completion_tokens else ""
    return f"{speed}{tokens}{took}"


def _copied_note(run: RunRecord) -> str:
    copied = [s.index for s in run.stages if s.status == "copied"]
    if not copied:
        return ""
    steps = "step" if len(copied) == 1 else "steps"
    return f" ({steps} {', '.join(map(str, copied))} copied from {run.parent_session or 'the parent session'})"


def describe(fig: Figure) -> list[dict[str, Any]]:
    """Every drawn bar with a gid: its gid, x, y, width and height in data units (what the chart shows)."""
    out = []
    for ax in fig.axes:
        for p in ax.patches:
            gid = p.get_gid()
            if gid and isinstance(p, Rectangle):
                out.append({"gid": gid, "x": p.get_x(), "y": p.get_y(), "width": p.get_width(),
                            "height": p.get_height()})
    return out
