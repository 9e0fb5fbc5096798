"""The chat's feedback: thumbs up/down on every reply, "Correct this reply" (the reply it should have given,
and a comment), and in compare mode which side was better.

When a reply starts, Handlers records its Turn here (serve.feedback.turn_of: the messages as the model
saw them, the adapter and its version, the settings), per browser session and side; nothing is written
until someone rates or corrects the reply, which serve.feedback then stores for the caller
(serve.access.request_caller). A reply from before the page was (re)loaded has no Turn, so it cannot be
rated: what produced it is not known. Every action follows the API's rule (ui.access.admit), and replies
show in Textboxes as plain text.
"""

from __future__ import annotations

import html
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable

import gradio as gr

from serve.access import LOCAL, AccessPolicy, Caller, request_caller
from serve.feedback import RecordGone, Turn, correct, digest, prefer, rate
from serve.store import Store, StoreError
from ui.access import admit
from ui.history import index_of, plain

logger = logging.getLogger(__name__)

SIDES = ("chat", "base")  # the chat's own column, compare mode's base model column
SIDE_NAMES = {"chat": "Assistant", "base": "Base model (adapter off)"}
BETTER = [("Assistant (left) was better", "left"), ("Base model (right) was better", "right"), ("Tie", "tie")]
NO_TURN = ("This reply was written before the page was (re)loaded, so what produced it is not known and it "
           "cannot be rated; send the message again (Retry) to rate the new reply.")
NO_REPLY = "There is no reply to correct yet: send a message first."
MAX_SESSIONS = 200  # browser sessions whose Turns are kept (the oldest go first; a closed page's go at once)
MAX_TURNS = 100  # Turns kept per session, both sides together (the oldest go first)


class TurnLog:
    """The Turn of each reply this app generated, per browser session, side and message index."""

    def __init__(self) -> None:
        self._sessions: OrderedDict[str, OrderedDict[tuple[str, int], Turn]] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, session: str, side: str, index: int, turn: Turn) -> None:
        """Record the Turn of the reply at `index` of `side` (a new reply there replaces the older one)."""
        with self._lock:
            turns = self._sessions.setdefault(session, OrderedDict())
            self._sessions.move_to_end(session)
            turns.pop((side, index), None)
            turns[(side, index)] = turn
            while len(turns) > MAX_TURNS:
                turns.popitem(last=False)
            while len(self._sessions) > MAX_SESSIONS:
                self._sessions.popitem(last=False)

    def get(self, session: str | None, side: str, index: int) -> Turn | None:
        """The Turn of the reply at `index` of `side`, if this session generated it."""
        with self._lock:
            return self._sessions.get(session or "", {}).get((side, index))

    def forget(self, session: str | None) -> None:
        """Drop a closed session's Turns."""
        with self._lock:
            self._sessions.pop(session or "", None)


class FeedbackPanel:
    """The chat's feedback components and event functions over the server's store."""

    def __init__(self, turns: TurnLog, store: Callable[[], Store], access: AccessPolicy | None):
        # access None only for in-process use, where no caller is remote (as Handlers and TrainTab take it).
        self.turns, self.store, self.access = turns, store, access

    # -- layout --------------------------------------------------------------------------------------
    def layout(self) -> None:
        """The correction panel and compare mode's "which was better" row (call under the chat's buttons)."""
        with gr.Row(visible=False, elem_id="feedback-compare") as self.compare_row:
            self.better = gr.Radio(BETTER, value=None, label="Which side's last reply was better?", scale=4,
                                   elem_id="feedback-better")
            self.better_btn = gr.Button("Save choice", size="sm", scale=1, elem_id="feedback-better-save")
        with gr.Accordion("Correct this reply", open=False, elem_id="feedback") as self.panel:
            self.reply = gr.Textbox(label="The reply", lines=3, max_lines=10, interactive=False,
                                    placeholder="Rate a reply (thumb up or down) or open this panel to correct "
                                                "the newest one.", elem_id="feedback-reply")
            self.correction = gr.Textbox(label="The reply it should have given", lines=4, max_lines=20,
                                         elem_id="feedback-correction")
            self.comment = gr.Textbox(label="Comment (optional)", lines=1, max_lines=4, elem_id="feedback-comment")
            self.save_btn = gr.Button("Save correction", variant="primary", size="sm", elem_id="feedback-save")
        self.target = gr.State(None)  # {"side", "index"}: the reply the panel is about

    def wire(self, demo: gr.Blocks, chatbot: gr.Chatbot, base: gr.Chatbot, compare: gr.Checkbox) -> None:
        """Connect the thumbs of both chat columns, the panel and the compare row."""
        quick = {"api_visibility": "private"}
        shown = [self.target, self.panel, self.reply, self.correction, self.comment]
        chatbot.like(self.like_chat, chatbot, shown, **quick)
        base.like(self.like_base, base, shown, **quick)
        self.panel.expand(self.newest, [chatbot, self.target], shown, **quick)
        self.save_btn.click(self.save, [self.target, chatbot, base, self.correction, self.comment], None, **quick)
        self.better_btn.click(self.choose, [self.better, chatbot, base], self.better, **quick)
        compare.change(lambda on: gr.update(visible=bool(on)), compare, self.compare_row, queue=False, **quick)
        demo.unload(self.forget)

    # -- events --------------------------------------------------------------------------------------
    def like_chat(self, data: gr.LikeData, history: list, request: gr.Request) -> tuple:
        """A thumb on a reply of the chat's own column."""
        return self.like("chat", data, history, request)

    def like_base(self, data: gr.LikeData, history: list, request: gr.Request) -> tuple:
        """A thumb on a reply of compare mode's base column."""
        return self.like("base", data, history, request)

    def like(self, side: str, data: gr.LikeData, history: list, request: gr.Request | None) -> tuple:
        """Store the thumb (True: up, False: down, "": taken back); the panel then shows that reply, opened
        on a thumb down to ask for the better reply."""
        who = self._caller(request, "rating a reply")
        index = index_of(data.index)
        turn, reply = self._turn(request, side, plain(history), index)
        if data.liked not in (True, False, ""):  # only the thumbs are offered (feedback_options)
            raise gr.Error("Rate a reply with a thumb up or down.")
        done = self._stored(lambda: rate(self.store(), who, turn, reply, data.liked))
        opened = gr.update(open=True) if data.liked is False else gr.skip()
        return ({"side": side, "index": index}, opened, reply, (done.correction if done and done.correction else reply),
                (done.comment or "") if done else "")

    def newest(self, history: list, target: dict | None, request: gr.Request) -> tuple:
        """The panel opened by hand: about the reply it was about, else the newest of the chat's column."""
        if target:
            return (gr.skip(),) * 5
        history = plain(history)
        index = next((i for i in range(len(history) - 1, -1, -1) if history[i]["role"] == "assistant"), None)
        if index is None:
            return None, gr.skip(), "", "", ""
        reply = history[index]["content"]
        return {"side": "chat", "index": index}, gr.skip(), reply, reply, ""

    def save(self, target: dict | None, history: list, base: list, correction: str, comment: str,
             request: gr.Request) -> None:
        """Store the correction and the comment of the reply the panel is about."""
        who = self._caller(request, "correcting a reply")
        if not target or target.get("side") not in SIDES:
            raise gr.Error(NO_REPLY)
        side, index = target["side"], int(target["index"])
        turn, reply = self._turn(request, side, plain(history if side == "chat" else base), index)
        try:
            done = self._stored(lambda: correct(self.store(), who, turn, reply, correction, comment))
        except ValueError as error:  # nothing given
            raise _error(str(error)) from None
        gr.Info("Saved: the Data tab lists it for review." if done is not None else "Cleared.")

    def choose(self, better: str | None, history: list, base: list, request: gr.Request) -> dict:
        """Compare mode: which side's last reply was better."""
        who = self._caller(request, "choosing the better reply")
        if better not in {value for _, value in BETTER}:
            raise gr.Error("Choose which side was better (or Tie) first.")
        history, base = plain(history), plain(base)
        left, right = _last_reply(history), _last_reply(base)
        if left is None or right is None:
            raise gr.Error("Both sides need a reply to compare: send a message in compare mode first.")
        sides = (self._turn(request, "chat", history, left), self._turn(request, "base", base, right))
        self._stored(lambda: prefer(self.store(), who, sides[0], sides[1], better))
        gr.Info("Saved your choice: the Data tab lists it for review.")
        return gr.update(value=None)

    def forget(self, request: gr.Request) -> None:
        """A closed page: its Turns go."""
        self.turns.forget(getattr(request, "session_hash", None))

    # -- helpers -------------------------------------------------------------------------------------
    def _caller(self, request: gr.Request | None, action: str) -> Caller:
        admit(self.access, request, action)
        return request_caller(self.access, request) if self.access is not None else Caller(LOCAL)

    def _turn(self, request: gr.Request | None, side: str, history: list[dict], index: int) -> tuple[Turn, str]:
        """The Turn and text of the reply at `index`; gr.Error when this session did not generate it."""
        if not 0 <= index < len(history) or history[index]["role"] != "assistant":
            raise gr.Error("Only the assistant's replies can be rated or corrected.")
        turn = self.turns.get(getattr(request, "session_hash", None), side, index)
        if turn is None or turn.context != digest(history[:index]):
            raise gr.Error(NO_TURN)
        return turn, history[index]["content"]

    @staticmethod
    def _stored(action: Callable):
        try:
            return action()
        except StoreError as error:
            raise _error(f"Feedback could not be saved: {error}") from None
        except RecordGone as error:
            raise _error(str(error)) from None


def _last_reply(history: list[dict]) -> int | None:
    """Index of the last message when it is a reply, else None."""
    return len(history) - 1 if history and history[-1]["role"] == "assistant" else None


def _error(message: str) -> gr.Error:
    """An error toast; Gradio renders its message as HTML, and this one may quote a reply."""
    return gr.Error(html.escape(message, quote=False))

