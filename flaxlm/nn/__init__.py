"""flaxlm.nn: Flax NNX modules (pytrees of parameters) built on flaxlm.ops."""

from flaxlm.nn.attention import KVCache, MultiHeadAttention
from flaxlm.nn.attention_pooling import AttentionPooling
from flaxlm.nn.cnn import Conv1DTextEncoder
from flaxlm.nn.embeddings import Embed, PositionEmbedding
from flaxlm.nn.feedforward import FeedForward
from flaxlm.nn.recurrent import RNN, GRUCell, LSTMCell, RNNCell
from flaxlm.nn.transformer import (
    TransformerDecoder,
    TransformerDecoderLayer,
    TransformerEncoder,
    TransformerEncoderLayer,
)

__all__ = [
    "AttentionPooling",
    "Conv1DTextEncoder",
    "Embed",
    "FeedForward",
    "GRUCell",
    "KVCache",
    "LSTMCell",
    "MultiHeadAttention",
    "PositionEmbedding",
    "RNN",
    "RNNCell",
    "TransformerDecoder",
    "TransformerDecoderLayer",
    "TransformerEncoder",
    "TransformerEncoderLayer",
]
