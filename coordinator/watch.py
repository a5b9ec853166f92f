"""`fedslim-coordinator watch FEDERATION`: the round in flight, live, until the federation
ends. A progress bar per round on a terminal (rich); one plain line per change otherwise
(a log, a pipe). Exit status: 0 completed or stopped, 1 failed, 3 --timeout reached."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from pydantic import ConfigDict, ValidationError

from coordinator.protocol import RoundInFlight

if TYPE_CHECKING:
    from rich.console import Console

    from coordinator.opcli import Api

__all__ = ["watch"]

_ENDED = {"completed": 0, "stopped": 0, "failed": 1}


class _Live(RoundInFlight):
    model_config = ConfigDict(extra="ignore")  # a newer coordinator may say more


def _live(api: Api, fid: str) -> _Live:
    from coordinator.opcli import CliError

    data = api.call("GET", f"/v1/federations/{fid}/live")
    try:
        return _Live.model_validate(data)
    except ValidationError as exc:
        raise CliError(f"unexpected answer for the round in flight: {exc.error_count()} invalid fields") from None


def _names(api: Api) -> dict[str, str]:
    from coordinator.opcli import clean

    agents = api.call("GET", "/v1/agents")
    return {str(a["id"]): clean(a.get("name", a["id"]), 64) for a in agents
            if isinstance(a, dict) and "id" in a} if isinstance(agents, list) else {}


def describe(live: _Live, names: dict[str, str]) -> str:
    """One line: round, updates, deadline, who is missing (stragglers once it passed)."""
    if live.round is None:
        return f"{live.completed_rounds}/{live.rounds} rounds done; {live.status.value}, no round open"
    waiting = ", ".join(names.get(a, a) for a in live.waiting_for[:10]) + (" …" if len(live.waiting_for) > 10 else "")
    late = (live.seconds_left or 0) <= 0
    line = (f"round {live.round}/{live.rounds} (attempt {live.attempt}): {live.received}/{live.expected} updates"
            f"{f', {live.declined} declined' if live.declined else ''}, "
            f"{'deadline passed' if late else f'{live.seconds_left:.0f} s to the deadline'}")
    return line + (f"; {'stragglers' if late else 'waiting for'}: {waiting}" if waiting else "")


def _ending(api: Api, fid: str, live: _Live) -> str:
    from coordinator.opcli import clean

    fed = api.call("GET", f"/v1/federations/{fid}")
    rows = api.call("GET", f"/v1/federations/{fid}/rounds")
    last = rows[-1] if isinstance(rows, list) and rows and isinstance(rows[-1], dict) else {}
    acc = last.get("accuracy")
    line = f"federation {fid} {live.status.value} after {live.completed_rounds}/{live.rounds} rounds"
    line += f", accuracy {acc:.4f}" if isinstance(acc, float) else ""
    error = fed.get("error") if isinstance(fed, dict) else None
    return line + (f": {clean(error)}" if error else "")


def watch(api: Api, fid: str, *, interval: float = 1.0, timeout: float | None = None,
          console: Console | None = None) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    console = console or Console(highlight=False)
    give_up = None if timeout is None else time.monotonic() + timeout
    names: dict[str, str] = {}
    shown: tuple[int, int] | None = None  # (round, attempt) of the newest bar
    last_line = ""
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[info]}"), console=console, transient=False)
    task: Any = None
    live_display = console.is_interactive  # a terminal that redraws (not a pipe, not TERM=dumb)

    def finish_bar(info: str) -> None:
        if task is not None:
            progress.update(task, completed=progress.tasks[-1].total, info=info)

    if live_display:
        progress.start()
    try:
        while True:
            live = _live(api, fid)
            if live.status.value in _ENDED:
                finish_bar("closed")
                break
            key = (live.round, live.attempt or 1) if live.round is not None else None
            if key != shown and (key is None or shown is None or key[0] > shown[0]):
                finish_bar("closed")  # the bar's round closed (retries keep their own bars below)
            if key is not None and key != shown:
                names, shown = _names(api), key  # the new sample may hold agents not seen yet
                if live_display:
                    task = progress.add_task(f"round {live.round}/{live.rounds}" + (f" attempt {key[1]}" if key[1] > 1 else ""),
                                             total=max(live.expected, 1), info="")
            line = describe(live, names)
            if live_display and key is not None and task is not None:
                progress.update(task, completed=live.received + live.declined, info=escape(line.split(": ", 1)[-1]))
            elif not live_display and line != last_line:
                console.print(line, markup=False)
            last_line = line
            if give_up is not None and time.monotonic() > give_up:
                console.print(f"gave up after {timeout:g} s: {line}", markup=False)
                return 3
            time.sleep(interval)
    finally:
        if live_display:
            progress.stop()
    console.print(_ending(api, fid, live), markup=False)
    return _ENDED[live.status.value]
