"""What a command may do to the running agent: reset a latched alarm, set the production state (halted or
normal, which arms the halt-violation rule). Each change is stored before it is answered.

It acts through the pipeline's public surface (its alarm engine and `store_events`), never its internals.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from agent.store import Store

if TYPE_CHECKING:
    from agent.pipeline.ingest import Pipeline

log = logging.getLogger(__name__)

PRODUCTION_STATES = ("normal", "halted")


class Actions:
    def __init__(self, pipeline: Pipeline, store: Store) -> None:
        self.pipeline = pipeline
        self.store = store
        self.production_state = "normal"

    def restore(self) -> None:
        """The production state as it was before the restart, and the halt rules armed to match."""
        saved = self.store.attempt("reading the production state", lambda: self.store.meta("production_state"))
        self.production_state = str(saved) if saved in PRODUCTION_STATES else "normal"
        events = self.pipeline.alarms.set_halted(self.production_state == "halted", int(time.time() * 1000))
        if events:  # a violation saved as raised while the state says normal (a crash between two commits)
            self.pipeline.store_events(events)

    def reset_alarm(self, alarm_id: str) -> dict[str, Any]:
        """Reset a latched alarm; raises ResetRefused with the reason when it cannot be."""
        event = self.pipeline.alarms.reset(alarm_id, int(time.time() * 1000))
        self.pipeline.store_events([event])
        return {"alarm": alarm_id, "state": "reset"}

    def set_production_state(self, state: str) -> dict[str, Any]:
        if state not in PRODUCTION_STATES:
            raise ValueError(f"production state must be 'normal' or 'halted', not {state!r}")
        previous, self.production_state = self.production_state, state

        def save() -> None:
            with self.store.transaction(durable=True):
                self.store.set_meta("production_state", state)

        self.store.attempt("saving the production state", save)
        events = self.pipeline.alarms.set_halted(state == "halted", int(time.time() * 1000))
        if events:
            self.pipeline.store_events(events)
        if previous != state:
            log.warning("production state: %s -> %s", previous, state)
        return {"production_state": state, "previous": previous}
