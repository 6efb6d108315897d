"""One exception type for every user-facing failure: the CLI prints its message as one line."""
import difflib


class TTABenchError(Exception):
    """A problem the user can fix; the message says how."""


class RunFailed(TTABenchError):
    """Some cells of a run failed; the others and the leaderboard were written (exit code 1)."""


def did_you_mean(name: str, known) -> str:
    known = sorted(known)
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return f"{hint}known: {', '.join(known) if known else '(none)'}"
