"""One exception type for every user-facing failure: the CLI prints its message as one line."""

import difflib
import unicodedata


class TTABenchError(Exception):
    """A problem the user can fix; the message says how."""


class RunFailed(TTABenchError):
    """Some cells of a run failed; the others and the leaderboard were written (exit code 1)."""


def did_you_mean(name: str, known) -> str:
    known = sorted(known)
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return f"{hint}known: {', '.join(known) if known else '(none)'}"


def control_character_problems(value, where: str = "") -> list[str]:
    """A problem for each string of a bench (key or value) that holds a control character (a NUL byte,
    a tab, an escape...): names become folders, files and labels, and such a name is a broken path."""
    if isinstance(value, dict):
        return [
            p
            for k, v in value.items()
            for p in control_character_problems(k, where or "key")
            + control_character_problems(v, f"{where}.{k}".lstrip("."))
        ]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in control_character_problems(v, f"{where}[{i}]")]
    bad = next((c for c in value if unicodedata.category(c) == "Cc"), None) if isinstance(value, str) else None
    return (
        []
        if bad is None
        else [f"{where or 'value'}: {value!r} holds the control character {bad!r}; use printable names only"]
    )
