"""Chat text stays text: raw HTML in a message shows literally and no message can make the browser fetch a URL.

A reply (or a pasted message) is Markdown from someone we do not trust. Gradio's sanitizer removes scripts
and event handlers but keeps `<img src=http://...>`, Markdown images and `style="background:url(...)"`, each
a request to any server the text names (a model coaxed into writing one leaks the chat in the URL). Two
layers stop that:

- SHOWN_AS_TEXT goes to the Chatbot's `allow_tags`: Gradio escapes these tag names in the rendered HTML, so
  `<img ...>`, `<b>` or `<script>` in a message show as the characters typed, and a Markdown image shows as
  the `<img ...>` text it would have become.
- Every response carries a Content-Security-Policy that allows images and media only from the app itself
  (and data:/blob: URLs, which Gradio uses for its own icons and uploads), so anything that still reaches
  the page as an element (a style attribute, a tag Gradio renders) cannot load a third-party URL.
"""

from __future__ import annotations

import logging
from typing import Any

import gradio as gr
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger(__name__)

# 'self' is this scheme, host and port: another port on the same host counts as a third party.
POLICY = "img-src 'self' data: blob:; media-src 'self' data: blob:"

# HTML and SVG element names (the ones Gradio's markdown renderer knows as standard).
_ELEMENTS = """
a abbr acronym address applet area article aside audio b base basefont bdi bdo big blockquote body br button
canvas caption center cite code col colgroup data datalist dd del details dfn dialog dir div dl dt em embed
fieldset figcaption figure font footer form frame frameset h1 h2 h3 h4 h5 h6 head header hgroup hr html i
iframe img input ins kbd label legend li link main map mark menu meta meter nav noframes noscript object ol
optgroup option output p param picture pre progress q rp rt ruby s samp script search section select small
source span strike strong style sub summary sup svg table tbody td template textarea tfoot th thead time
title tr track tt u ul var video wbr
g defs use symbol rect circle ellipse line polyline polygon path image text tspan textPath linearGradient
radialGradient stop pattern clipPath mask filter animate animateTransform animateMotion mpath set view
foreignObject desc metadata switch
""".split()
# What the renderer itself writes for Markdown syntax, highlighted code and a code block's copy button: raw
# HTML using these renders like the Markdown that makes them. `img` is not here on purpose (see above).
_RENDERED = set(
    "a blockquote br button code del div em h1 h2 h3 h4 h5 h6 hr input li ol p path pre span strong svg table "
    "tbody td th thead tr ul".split()
)
SHOWN_AS_TEXT: list[str] = [name for name in _ELEMENTS if name not in _RENDERED]


class ContentSecurityPolicy:
    """ASGI middleware: adds POLICY to every HTTP response (pure ASGI, so streamed replies stay streamed)."""

    def __init__(self, app: ASGIApp, policy: str = POLICY):
        self.app = app
        self.header = (b"content-security-policy", policy.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_policy(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                if not any(name.lower() == self.header[0] for name, _ in headers):
                    headers.append(self.header)
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_policy)


class PolicedBlocks(gr.Blocks):
    """gr.Blocks whose server sends the Content-Security-Policy above with every response, however it is
    launched (python -m ui, app.py on a Space, the tests)."""

    def launch(self, *args: Any, **kwargs: Any):
        """gr.Blocks.launch, with the policy middleware added to the server app."""
        # Gradio builds its FastAPI app inside launch(); middleware must be given then, not added after.
        app_kwargs = dict(kwargs.pop("app_kwargs", None) or {})
        app_kwargs["middleware"] = [*app_kwargs.get("middleware", []), Middleware(ContentSecurityPolicy)]
        return super().launch(*args, app_kwargs=app_kwargs, **kwargs)
