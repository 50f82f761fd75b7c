"""The A/B labelling app: Gradio on the preference store (``python -m app configs/app.yaml``).

``build_app(args) -> gr.Blocks`` and ``create_fastapi_app(args)`` live in ``app.ui``; settings are
``app.main.AppArguments``. Importing this package is cheap: Gradio and torch load on first use.
"""


def build_app(args):
    from app.ui import build_app as _build

    return _build(args)


def create_fastapi_app(args):
    from app.ui import create_fastapi_app as _create

    return _create(args)
