"""Problems found on many Linears, said in one line: the same problem on several Linears once, with their count."""

from __future__ import annotations

from collections.abc import Iterable

PLACEHOLDER = "<Linear>"


def summarize(problems: list[str], linears: Iterable[str]) -> str:
    """'; '-joined problems, each problem that differs only by the Linear it names given once as
    '<problem> (210 Linears: model.layers.0.self_attn.q_proj, ...)'."""
    names = sorted(linears, key=len, reverse=True)  # model.layers.10.* before model.layers.1.*
    grouped: dict[str, list[str]] = {}
    for problem in problems:
        name = next((n for n in names if n in problem), None)
        key = problem.replace(name, PLACEHOLDER) if name else problem
        grouped.setdefault(key, []).extend([name] if name else [])
    return "; ".join(_counted(key, found) for key, found in grouped.items())


def _counted(problem: str, linears: list[str]) -> str:
    if len(linears) <= 1:
        return problem.replace(PLACEHOLDER, linears[0]) if linears else problem
    return f"{problem} ({len(linears)} Linears: {linears[0]}, ...)"
