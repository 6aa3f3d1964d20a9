"""``monkeytune serve``: a local web chat (Gradio) with image upload for any model folder.

* :class:`ChatEngine` (:mod:`.engine`): one loaded model answering chat turns, streaming, one
  generation at a time;
* :func:`build_app` (:mod:`.app`): the page;
* :func:`start` (:mod:`.launch`): load a folder (or the demo's model) and serve it;
  :func:`launch_app` serves an engine already loaded;
* :class:`TilingView` (:mod:`.tiling`): the picture of the windows and global view;
* :func:`check_upload` (:mod:`.uploads`): upload validation with messages for the page.

``monkeytune api``, the OpenAI-compatible server: :class:`APIServer` (:mod:`.api`, the Starlette
app; requests read by :mod:`.api_request` and :mod:`.api_inputs`, errors in :mod:`.api_errors`),
:class:`Batcher` (:mod:`.batching`, dynamic batches on one worker thread), :func:`load_api` and
:func:`start_in_thread` (:mod:`.api_launch`).

Gradio is an optional dependency (``pip install monkeytune[serve]``); :mod:`.app` and
:func:`start` import it, the rest does not. The API needs Starlette and uvicorn (which the same
extra brings), not Gradio.
"""

import importlib
from typing import Any

# Public name -> its module, imported when first used: the engine imports torch and transformers,
# and the command line reads the launch defaults without them.
_EXPORTS = {
    **dict.fromkeys(["TEMPLATE_LABELS", "ChatEngine", "Exchange", "settings_from_form"], "monkeytune.serve.engine"),
    **dict.fromkeys(["DEFAULT_HOST", "DEFAULT_PORT", "NoModelError", "exposure_warning", "find_demo_model",
                     "launch_app", "start"], "monkeytune.serve.launch"),
    **dict.fromkeys(["TilingView", "describe_tiling", "draw_tiling"], "monkeytune.serve.tiling"),
    **dict.fromkeys(["UploadError", "UploadLimits", "check_upload"], "monkeytune.serve.uploads"),
    **dict.fromkeys(["APIServer", "APISettings"], "monkeytune.serve.api"),
    **dict.fromkeys(["load_api", "start_in_thread"], "monkeytune.serve.api_launch"),
    "Batcher": "monkeytune.serve.batching",
    "RequestLimits": "monkeytune.serve.api_request",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'monkeytune.serve' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = [
    "APIServer",
    "APISettings",
    "Batcher",
    "ChatEngine",
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "Exchange",
    "NoModelError",
    "TEMPLATE_LABELS",
    "TilingView",
    "UploadError",
    "UploadLimits",
    "check_upload",
    "describe_tiling",
    "draw_tiling",
    "exposure_warning",
    "find_demo_model",
    "launch_app",
    "load_api",
    "RequestLimits",
    "settings_from_form",
    "start",
    "start_in_thread",
]
