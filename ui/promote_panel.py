"""The chat tab's "Promote" panel: which model the serving alias (e.g. `production`) names, its history, and
Promote (the chosen model, through serve.promotion's gate, or forced with a reason) and Roll back.

The same act as `python -m serve.promote` and `POST /v1/aliases/{alias}/promote`: an admin's while a key or a
login is on (serve.promotion_api.may_move_aliases), anyone's the app admits otherwise. What is shown (model
names, reasons, the evaluation's figures) is plain text in Textboxes, never Markdown or HTML.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import gradio as gr

from serve.access import AccessPolicy, request_caller
from serve.promotion import BASE_ID, PromotionError, Promotions
from serve.promotion_api import may_move_aliases
from serve.registry import BASE_CHOICE
from ui.access import admit

logger = logging.getLogger(__name__)

HISTORY_SHOWN = 5


class PromotePanel:
    """The panel's components and its two actions over the server's Promotions of `alias`."""

    def __init__(self, promotions: Callable[[], Promotions], access: AccessPolicy | None, alias: str):
        # access None only for in-process use, where no caller is remote (as the other panels take it).
        self.promotions, self.access, self.alias = promotions, access, alias

    def layout(self) -> None:
        """The collapsed accordion (call inside the chat tab's right column, under the Adapter menu)."""
        with gr.Accordion(f"Promote to {self.alias}", open=False, elem_id="promote"):
            self.state = gr.Textbox(self.describe(), label=f"What {self.alias} serves", lines=3, max_lines=10,
                                    interactive=False, elem_id="promote-state")
            self.force = gr.Checkbox(False, label="Force (skip the evaluation gate)", elem_id="promote-force")
            self.reason = gr.Textbox(label="Reason (required to force; recorded)", lines=1, elem_id="promote-reason")
            with gr.Row():
                self.promote_btn = gr.Button("Promote the chosen model", size="sm", elem_id="promote-run")
                self.rollback_btn = gr.Button("Roll back", size="sm", elem_id="promote-rollback")
            self.result = gr.Textbox(label="Result", lines=3, max_lines=12, interactive=False, elem_id="promote-result")

    def wire(self, demo: gr.Blocks, choice: gr.Dropdown) -> None:
        """Connect Promote to the chat's Adapter menu `choice`; the state is read again on each page load."""
        private = {"api_visibility": "private"}
        self.promote_btn.click(self.promote, [choice, self.force, self.reason], [self.result, self.state],
                               concurrency_limit=1, **private)
        self.rollback_btn.click(self.rollback, [self.reason], [self.result, self.state], concurrency_limit=1,
                                **private)
        demo.load(self.describe, None, self.state, queue=False, **private)

    def describe(self) -> str:
        """The alias's model now and its newest moves."""
        promotions = self.promotions()
        target = promotions.aliases().get(self.alias)
        lines = [f"{self.alias} -> {target}" if target else
                 f"{self.alias} is unset: the app serves {promotions.current(self.alias)} by default"]
        lines += [record.describe() for record in promotions.history(self.alias, HISTORY_SHOWN)]
        return "\n".join(lines)

    def promote(self, choice: str | None, force: bool, reason: str, request: gr.Request | None) -> tuple[str, str]:
        """Promote the menu's choice: (what happened, the alias's state)."""
        refused = self._refused(request)
        if refused:
            return refused, self.describe()
        model = BASE_ID if not choice or choice == BASE_CHOICE else choice
        try:
            record = self.promotions().promote(self.alias, model, who=self._who(request), force=bool(force),
                                               reason=reason)
        except PromotionError as error:
            return str(error), self.describe()
        return record.describe() + (f"\nEvidence: {record.evidence}" if record.evidence else ""), self.describe()

    def rollback(self, reason: str, request: gr.Request | None) -> tuple[str, str]:
        """Roll the alias back one promotion: (what happened, the alias's state)."""
        refused = self._refused(request)
        if refused:
            return refused, self.describe()
        try:
            record = self.promotions().rollback(self.alias, who=self._who(request), reason=reason)
        except PromotionError as error:
            return str(error), self.describe()
        return record.describe(), self.describe()

    def _refused(self, request: gr.Request | None) -> str | None:
        try:
            admit(self.access, request, "a promotion")
        except gr.Error as refused:
            return f"Refused: {refused.message}"
        if self.access is not None and not may_move_aliases(self.access, request_caller(self.access, request)):
            return ("Refused: moving a model alias is an admin's act; log in as a user named in --admins "
                    "(or use the API key).")
        return None

    def _who(self, request: gr.Request | None) -> str:
        return request_caller(self.access, request).name if self.access is not None else "app"
