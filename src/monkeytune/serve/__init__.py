"""``monkeytune serve``: a local web chat (Gradio) with image upload for any model folder.

* :class:`ChatEngine` (:mod:`.engine`): one loaded model answering chat turns, streaming, one
  generation at a time;
* :func:`build_app` (:mod:`.app`): the page;
* :func:`start` (:mod:`.launch`): load a folder (or the demo's model) and serve it;
  :func:`launch_app` serves an engine already loaded;
* :class:`TilingView` (:mod:`.tiling`): the picture of the windows and global view;
* :func:`check_upload` (:mod:`.uploads`): upload validation with messages for the page.

Gradio is an optional dependency (``pip install monkeytune[serve]``); :mod:`.app` and
:func:`start` import it, the rest does not.
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
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'monkeytune.serve' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = [
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
    "settings_from_form",
    "start",
]
