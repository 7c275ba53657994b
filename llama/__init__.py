"""codellama: an inference engine for Code Llama checkpoints."""

from llama.generation import Llama
from llama.model import ModelArgs, Transformer
from llama.prompts import Dialog, Message
from llama.tokenizer import Tokenizer

__all__ = ["Llama", "Tokenizer", "ModelArgs", "Transformer", "Dialog", "Message"]
