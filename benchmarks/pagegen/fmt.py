"""Markdown and number formatting shared by the page sections."""
from __future__ import annotations

from cgf_fhe import stats
from cgf_fhe.fmt import fmt_seconds


def num(v, digits: int = 4) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, int):
        return f"{v:,}"
    return f"{v:.{digits}f}"


def sci(v) -> str:
    return "n/a" if v is None else f"{v:.2e}"


def secs(v) -> str:
    return fmt_seconds(v, minutes_from=120)


def signed(v, digits: int = 2) -> str:
    return "n/a" if v is None else f"{v:+.{digits}f}"


def pm(values, digits: int = 4, sign: bool = False) -> str:
    """'mean ± std' over values (None skipped); one value says so instead of printing a spread."""
    vals = [v for v in values if v is not None]
    ms = stats.mean_std(vals)
    if ms.n == 0:
        return "n/a"
    f = (lambda x: f"{x:+.{digits}f}") if sign else (lambda x: f"{x:.{digits}f}")
    if ms.n == 1:
        return f"{f(ms.mean)} (n = 1, no std)"
    return f"{f(ms.mean)} ± {ms.std:.{digits}f}"


def interval(values, digits: int = 2) -> str:
    ci = stats.t_interval([v for v in values if v is not None])
    return "n/a" if ci is None else f"[{ci[0]:+.{digits}f}, {ci[1]:+.{digits}f}]"


def table(cols, rows) -> list[str]:
    return (["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def code(cmd: str) -> list[str]:
    return [f"    {c}" for c in cmd.split("\n")] + [""]


def cite(rec: dict) -> str:
    """Where a section's figures come from."""
    src = f"[`records/{rec['name']}.json`](../records/{rec['name']}.json)"
    if rec["source"] == "recovered-from-page":
        rf = rec["recovered_from"]
        return (f"Record: {src}, recovered from `{rf['page']}` at commit {rf['commit']} (its section "
                f"\"{rf['section'].replace('`', '')}\"); notes below are quoted from that page.")
    when = f", recorded {rec['created']}" if rec.get("created") else ""
    frm = f" from `{rec['read_from']}`" if rec.get("read_from") else ""
    return f"Record: {src}{frm}{when}."


def not_run(cmd: str) -> str:
    return f"not run: `{cmd}`"


def notes(lines: list[str]) -> list[str]:
    """A record's notes as markdown: bullets stay together, every paragraph stands apart."""
    out: list[str] = []
    for ln in lines:
        if not (ln.startswith("- ") and out and out[-1].startswith("- ")):
            out.append("")
        out.append(ln)
    return out + [""]
