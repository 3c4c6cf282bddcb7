"""flaxlm.models: the model families, one small file each, each with a frozen dataclass config."""

from flaxlm.models.bert import BertConfig, BertEncoder, BertMLM, mask_tokens
from flaxlm.models.classifier import ClassifierConfig, TextClassifier
from flaxlm.models.gpt import GPT, GPTConfig
from flaxlm.models.seq2seq import Seq2Seq, Seq2SeqConfig, Seq2SeqState
from flaxlm.models.transformer import Transformer, TransformerConfig

__all__ = [
    "BertConfig",
    "BertEncoder",
    "BertMLM",
    "ClassifierConfig",
    "GPT",
    "GPTConfig",
    "Seq2Seq",
    "Seq2SeqConfig",
    "Seq2SeqState",
    "TextClassifier",
    "Transformer",
    "TransformerConfig",
    "mask_tokens",
]
