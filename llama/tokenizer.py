"""SentencePiece tokenizer with Code Llama's special pieces and infilling encode/decode."""

import os
from typing import List, Optional

from sentencepiece import SentencePieceProcessor

# Pieces Code Llama adds to the Llama 2 vocabulary. They are looked up by piece, never by id.
PREFIX_PIECE, SUFFIX_PIECE, MIDDLE_PIECE, EOT_PIECE = "▁<PRE>", "▁<SUF>", "▁<MID>", "▁<EOT>"
STEP_PIECE = "<step>"


# Protobuf wire bytes of ModelProto field 3 (normalizer_spec, length 2) holding field 3
# (add_dummy_prefix, varint) = 0.
_NO_DUMMY_PREFIX_OVERRIDE = b"\x1a\x02\x18\x00"


class Tokenizer:
    """A SentencePiece model plus the ids of Code Llama's special pieces.

    `prefix_id`, `middle_id`, `suffix_id`, `eot_id` and `step_id` are None when the vocabulary
    lacks that piece (the model then cannot infill, or has no turn-based chat format).
    """

    def __init__(self, model_path: str):
        """Load the SentencePiece model at `model_path`.

        Raises:
            FileNotFoundError: if `model_path` is not a file.
            ValueError: if the file is not a SentencePiece model.
        """
        if not os.path.isfile(model_path):
            raise FileNotFoundError(
                f"tokenizer file {model_path!r} not found: pass --tokenizer_path pointing to the "
                "tokenizer.model that came with the checkpoint"
            )
        self.model_path = model_path
        self.sp_model = SentencePieceProcessor()
        try:
            self.sp_model.Load(model_path)
        except (OSError, RuntimeError) as err:
            raise ValueError(f"{model_path!r} is not a valid SentencePiece model: {err}") from err

        self.n_words: int = self.sp_model.vocab_size()
        self.bos_id: int = self.sp_model.bos_id()
        self.eos_id: int = self.sp_model.eos_id()
        self.pad_id: int = self.sp_model.pad_id()
        self.prefix_id = self.piece_id(PREFIX_PIECE)
        self.middle_id = self.piece_id(MIDDLE_PIECE)
        self.suffix_id = self.piece_id(SUFFIX_PIECE)
        self.eot_id = self.piece_id(EOT_PIECE)
        self.step_id = self.piece_id(STEP_PIECE)
        # The same model with the normaliser's dummy leading space turned off. A serialized
        # ModelProto may repeat its `normalizer_spec` field (number 3); parsers merge the
        # repeats, so appending one that holds only `add_dummy_prefix` (its field 3) = false
        # overrides that flag and nothing else. It encodes `s` exactly as the reference's
        # sentinel trick (`encode("<sentinel>" + s)[2:]`) without needing a sentinel piece in
        # the vocabulary, and decodes without dropping a leading space.
        self._sp_no_dummy_prefix = SentencePieceProcessor()
        self._sp_no_dummy_prefix.LoadFromSerializedProto(
            self.sp_model.serialized_model_proto() + _NO_DUMMY_PREFIX_OVERRIDE
        )
        # That equivalence needs the normaliser to keep whitespace as it is (Llama's does). One
        # that strips or collapses it would lose the leading space of a suffix: then refuse
        # rather than return different ids.
        probe = "x = 1"
        no_lead_ids = self._sp_no_dummy_prefix.encode(" " + probe)
        self._infilling_exact = (
            no_lead_ids == self.sp_model.encode(probe)
            and self._sp_no_dummy_prefix.decode(no_lead_ids) == " " + probe
        )

    def piece_id(self, piece: str) -> Optional[int]:
        """The id of `piece`, or None if the vocabulary does not contain it."""
        token_id = self.sp_model.piece_to_id(piece)
        if token_id == self.sp_model.unk_id() and piece != self.sp_model.id_to_piece(token_id):
            return None
        return token_id

    def encode(self, s: str, bos: bool, eos: bool) -> List[int]:
        """Encode `s` (with SentencePiece's dummy leading space), optionally adding BOS/EOS."""
        if not isinstance(s, str):
            raise TypeError(f"can only encode a str, got {type(s).__name__}")
        ids: List[int] = self.sp_model.encode(s)
        if bos:
            ids = [self.bos_id] + ids
        if eos:
            ids = ids + [self.eos_id]
        return ids

    def decode(self, ids: List[int]) -> str:
        """Decode token ids to text (a leading `▁` of the first piece is dropped)."""
        return self.sp_model.decode(list(ids))

    def token_piece(self, token_id: int) -> str:
        """The vocabulary piece of one token id."""
        return self.sp_model.id_to_piece(token_id)

    def encode_infilling(self, s: str) -> List[int]:
        """Encode `s` without the dummy leading space (the infilling suffix encoding).

        Raises:
            TypeError: if `s` is not a str.
            ValueError: if this tokenizer's normaliser changes whitespace, so that no exact
                encoding without the leading space exists.
        """
        if not isinstance(s, str):
            raise TypeError(f"can only encode a str, got {type(s).__name__}")
        self._require_exact_infilling()
        return self._sp_no_dummy_prefix.encode(s)

    def decode_infilling(self, ids: List[int]) -> str:
        """Decode ids keeping a leading space that `decode` would drop (infilled middles).

        Raises:
            ValueError: as `encode_infilling`.
        """
        self._require_exact_infilling()
        return self._sp_no_dummy_prefix.decode(list(ids))

    def _require_exact_infilling(self) -> None:
        if not self._infilling_exact:
            raise ValueError(
                f"the tokenizer {self.model_path} normalises whitespace, so text cannot be encoded "
                "or decoded exactly without its leading space: it cannot be used for infilling"
            )
