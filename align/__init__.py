"""align — an open alignment/RLHF workbench.

``import align`` stays light (the store and its CLI never load torch). The base decoder's classes are
reached lazily — ``from align import DecoderForCausalLM`` — and importing ``align.model`` (which every
command that loads a model does) registers them with transformers' Auto classes, so
``AutoModelForCausalLM.from_pretrained(dir)`` works on our checkpoints.
"""

__version__ = "0.1.0"

_MODEL_NAMES = ("DecoderConfig", "DecoderModel", "DecoderForCausalLM", "DecoderForSequenceClassification")


def __getattr__(name: str):
    if name in _MODEL_NAMES:
        from align import model

        return getattr(model, name)
    raise AttributeError(f"module 'align' has no attribute {name!r}")
