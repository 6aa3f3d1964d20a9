"""The Gradio page: image upload or paste, a tiling view, a streaming multi-turn chat and settings.

Uploads are validated by monkeytune itself (the image events take Gradio's raw file payload, so
a non-image or corrupt file never reaches Gradio's own decoder); every problem becomes a
message in the page's notice area. Generation events share one concurrency slot, so users are
served one answer at a time, in order.

API endpoints (for ``gradio_client``; state such as the current image lives in the client's
session): ``/set_image`` (image) -> (tiling, notice, chat), ``/ask`` (question, template,
max_new_tokens, sampling, temperature, top_p) -> (chat, question box, notice), streaming,
``/clear`` () -> (chat, notice).
"""

from __future__ import annotations

import os

# Set before Gradio is imported: it reads the variable at import time in places.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from typing import Any, Iterator  # noqa: E402

import gradio as gr  # noqa: E402

from monkeytune.limits import GenerationTimeout  # noqa: E402
from monkeytune.serve.engine import MAX_NEW_TOKENS, ChatEngine, Exchange, settings_from_form  # noqa: E402
from monkeytune.serve.uploads import UploadError, check_upload  # noqa: E402
from monkeytune.vision.image import ImageLoadError  # noqa: E402

__all__ = ["build_app", "chat_messages", "THEME", "CSS"]

# System fonts only: the default theme would fetch web fonts from the internet.
THEME = gr.themes.Soft(
    font=["ui-sans-serif", "system-ui", "Segoe UI", "Roboto", "sans-serif"],
    font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "monospace"],
)
CSS = """
#notice .prose { min-height: 1.2em; }
#notice-box.error { border-left: 4px solid #d62828; padding-left: 8px; }
footer { visibility: hidden; }
"""


def chat_messages(exchanges: list[Exchange]) -> list[dict[str, Any]]:
    """Chatbot messages for a list of exchanges; an image is shown where it was first sent."""
    messages: list[dict[str, Any]] = []
    shown: str | None = None
    for ex in exchanges:
        if ex.image and ex.image != shown:
            messages.append({"role": "user", "content": {"path": ex.image}})
            shown = ex.image
        messages.append({"role": "user", "content": ex.question or "(no question)"})
        if ex.answer:
            messages.append({"role": "assistant", "content": ex.answer})
    return messages


def _error(text: str) -> str:
    return f"⚠️ {text}"


def build_app(engine: ChatEngine, title: str = "monkeytune chat") -> gr.Blocks:
    """Build the page for one loaded model.

    Args:
        engine: The model to chat with.
        title: Browser tab title.

    Returns:
        The unlaunched :class:`gradio.Blocks` with its queue configured (one generation at a time).
    """
    templates = engine.templates()

    def on_image(payload: dict[str, Any] | None):
        # ``payload`` is Gradio's raw FileData (preprocess=False): path of the stored upload and
        # the user's file name. Nothing but check_upload decodes it. Any change of the image
        # starts a new chat, as switching images does in ``monkeytune chat``.
        if not payload:
            return None, "", None, [], []
        path, name = payload.get("path"), payload.get("orig_name") or "upload"
        if not path:
            return None, _error(f"{name!r} did not arrive as a file; please upload it again."), None, [], []
        try:
            image = check_upload(path, engine.limits, name=name)
            picture = engine.tiling_view.draw(image)
        except UploadError as e:
            return None, _error(str(e)), None, [], []
        except Exception as e:  # a server bug must still end as a message, not a dead page
            return None, _error(f"{name!r} could not be processed: {type(e).__name__}: {e}"), None, [], []
        width, height = image.size
        note = f"**{name}** ({width}×{height}) is ready: ask a question."
        return picture, note, {"path": path, "name": name}, [], []

    def ask(
        question: str,
        template: str,
        max_new_tokens: float,
        sampling: bool,
        temperature: float,
        top_p: float,
        image: dict[str, str] | None,
        exchanges: list[Exchange],
    ) -> Iterator[tuple]:
        question = (question or "").strip()
        exchange = Exchange(question, image["path"] if image else None)
        history = [*exchanges, exchange]
        try:
            settings = settings_from_form(max_new_tokens, sampling, temperature, top_p)
            # Refuses a question too long for the model (from its raw length first) before the
            # request waits for the generation slot.
            engine.prompt(history, template, settings.max_new_tokens)
        except ValueError as e:
            yield chat_messages(exchanges), exchanges, gr.skip(), _error(str(e))
            return
        yield chat_messages(history), history, "", ""
        try:
            for text in engine.stream(history, template, settings):
                exchange.answer = text
                yield chat_messages(history), history, gr.skip(), gr.skip()
        except GenerationTimeout as e:
            exchange.answer = exchange.answer or "…"
            yield chat_messages(history), history, gr.skip(), _error(f"{e}; the text so far is kept")
            return
        except ImageLoadError:
            # The stored upload was removed (cache clean-up) or damaged since it was checked.
            exchange.answer = exchange.answer or "…"
            yield chat_messages(history), history, gr.skip(), _error("the image can no longer be read; please upload it again")
            return
        except Exception as e:  # shown in the page; the server keeps serving
            exchange.answer = exchange.answer or "…"
            yield chat_messages(history), history, gr.skip(), _error(f"generation failed: {type(e).__name__}: {e}")
            return
        if not exchange.answer:
            exchange.answer = "(empty answer)"
            yield chat_messages(history), history, gr.skip(), gr.skip()

    def clear():
        return [], [], ""

    # Uploads live in Gradio's cache; files older than a day are removed every hour.
    with gr.Blocks(title=title, analytics_enabled=False, delete_cache=(3600, 86400)) as app:
        image_state = gr.State(None)
        exchanges_state = gr.State([])
        gr.Markdown(f"### {title} · `{engine.name}`")
        with gr.Row(equal_height=False):
            with gr.Column(scale=2, min_width=320):
                image = gr.Image(
                    label="Image (upload, drop or paste)",
                    type="filepath",
                    image_mode=None,
                    sources=["upload", "clipboard"],
                    height=300,
                    elem_id="image-input",
                )
                gr.Markdown("**What the model sees**: the windows (each with its own adapter slot) and the global view")
                tiling = gr.Image(
                    label="What the model sees",
                    show_label=False,
                    interactive=False,
                    format="png",
                    elem_id="tiling",
                    buttons=["fullscreen"],
                )
                gr.Markdown(engine.tiling_summary, elem_id="tiling-summary")
            with gr.Column(scale=3, min_width=400):
                notice = gr.Markdown("", elem_id="notice")
                chatbot = gr.Chatbot(label="Chat", height=440, elem_id="chat", feedback_options=None)
                with gr.Row():
                    question = gr.Textbox(
                        placeholder="Ask about the image and press Enter",
                        show_label=False,
                        scale=5,
                        elem_id="question",
                        max_lines=6,
                    )
                    send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
                with gr.Row():
                    stop = gr.Button("Stop", scale=1, elem_id="stop")
                    clear_btn = gr.Button("New chat", scale=1, elem_id="clear")
                with gr.Accordion("Prompt and generation", open=True):
                    template = gr.Radio(
                        choices=[(label, key) for key, label in templates.items()],
                        value=engine.default_template,
                        label="Prompt template",
                        elem_id="template",
                    )
                    with gr.Row():
                        max_new_tokens = gr.Slider(1, MAX_NEW_TOKENS, value=128, step=1, label="Max new tokens")
                        sampling = gr.Checkbox(value=False, label="Sample (off: greedy)")
                    with gr.Row():
                        temperature = gr.Slider(0.05, 2.0, value=0.7, step=0.05, label="Temperature")
                        top_p = gr.Slider(0.05, 1.0, value=0.9, step=0.05, label="Top-p")

        image.change(
            on_image,
            inputs=[image],
            outputs=[tiling, notice, image_state, chatbot, exchanges_state],
            preprocess=False,
            api_name="set_image",
            concurrency_limit=4,
            concurrency_id="images",
        )
        ask_inputs = [question, template, max_new_tokens, sampling, temperature, top_p, image_state, exchanges_state]
        ask_outputs = [chatbot, exchanges_state, question, notice]
        sent = send.click(ask, ask_inputs, ask_outputs, api_name="ask", concurrency_id="model")
        entered = question.submit(ask, ask_inputs, ask_outputs, api_visibility="private", concurrency_id="model")
        stop.click(None, None, None, cancels=[sent, entered], api_visibility="private")
        clear_btn.click(clear, None, [chatbot, exchanges_state, notice], api_name="clear", concurrency_limit=None)

    # One generation at a time across all users: later requests wait in the queue.
    app.queue(default_concurrency_limit=1, max_size=64)
    return app
