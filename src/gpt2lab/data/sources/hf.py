"""A Hugging Face dataset as a source, streamed with `datasets`, its position kept for resuming."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from typing import Any

from ...download import load_hf_dataset
from ...errors import GPT2LabError
from ..conversations import MESSAGES_FIELD, conversation_pieces
from ..text import DocumentPieces
from .base import Piece, Source, record_text


class HFSource(Source):
    """A Hugging Face dataset, read with `datasets` in streaming mode (nothing is stored as text)."""

    progress_unit = "doc"

    def __init__(
        self, dataset: str, shard_prefix: str, piece_chars: int, config: str | None, split: str, text_field: str
    ) -> None:
        super().__init__(dataset, shard_prefix, piece_chars)
        self.dataset, self.config, self.split, self.text_field = dataset, config, split, text_field
        self._ds: Any = None
        self._datasets_version = ""
        self._start: dict[str, Any] | None = None  # where pieces() starts (seek)
        self._position: dict[str, Any] | None = None  # after the last piece yielded

    def _where(self) -> str:
        config = f", config {self.config!r}" if self.config else ""
        return f"Hugging Face dataset {self.dataset!r}{config}, split {self.split!r}"

    def open(self) -> None:
        self._ds = load_hf_dataset(
            self.dataset,
            self.config,
            self.split,
            streaming=True,
            where=self._where(),
            check="check the name, --hf-config, --split and the network",
            instead="connect to the internet (a Hub dataset is streamed as it is tokenized), or prepare local "
            "text, JSONL or Parquet files: gpt2lab prepare PATH --out DIR",
        )
        import datasets  # loaded by load_hf_dataset

        self._datasets_version = datasets.__version__
        info = getattr(self._ds, "info", None)
        splits = getattr(info, "splits", None) or {}
        if self.split in splits and splits[self.split].num_examples:
            self.progress_total = int(splits[self.split].num_examples)

    def describe(self) -> dict[str, Any]:
        desc = {
            "kind": "hf",
            "dataset": self.dataset,
            "config": self.config,
            "split": self.split,
            "text_field": self.text_field,
        }
        if self.chat:
            desc.pop("text_field")
            desc["messages_field"] = MESSAGES_FIELD
        if self.preset is not None:
            desc["preset"] = self.preset.name
        return desc

    def record_fields(self) -> list[str] | None:
        features = getattr(self._ds, "features", None)
        if features is not None:
            return list(features)
        for example in self._ds:  # a stream that does not know its columns: look at its first example
            return list(example)
        return []

    def signature(self) -> str:
        return hashlib.sha256(json.dumps(self.describe(), sort_keys=True).encode()).hexdigest()

    def position_unsupported(self) -> str | None:
        if not (hasattr(self._ds, "state_dict") and hasattr(self._ds, "load_state_dict")):
            return (
                f"datasets {self._datasets_version} cannot save a streaming dataset's position "
                "(IterableDataset.state_dict needs datasets >= 2.18)"
            )
        return None

    def position(self) -> dict[str, Any] | None:
        return self._position

    def seek(self, position: dict[str, Any]) -> None:
        """Continue after `position`: the dataset's own stream state (`IterableDataset.state_dict()`,
        which `datasets` restores at its source shard and example offset) after `examples` examples,
        and how many pieces of the next example were already handed out."""
        if position.get("datasets") != self._datasets_version:
            raise ValueError(
                f"the position was saved by datasets {position.get('datasets')}, this is {self._datasets_version}"
            )
        self._start = position
        self.progress_done = position["examples"]

    def _mark(self, state: Any, examples: int, skip: int, empty: int) -> None:
        self._position = {
            "datasets": self._datasets_version,
            "state": state,
            "examples": examples,
            "skip_pieces": skip,
            "empty_documents": empty,
        }
        if self.chat:
            self._position["skipped_records"] = self.skipped_records.to_json()

    def pieces(self) -> Iterator[Piece]:
        doc = DocumentPieces(self.piece_chars)
        ds, start = self._ds, self._start
        tracked = self.position_unsupported() is None
        n, skip, before = 0, 0, None  # examples read; pieces of the next one to skip; state after n
        if start is not None:
            n, skip, before = start["examples"], start["skip_pieces"], start["state"]
            doc.empty_documents = start["empty_documents"]
            if self.chat:
                self.skipped_records.restore(start["skipped_records"])
            if before is not None:
                ds.load_state_dict(before)
        if tracked:
            self._mark(before, n, skip, doc.empty_documents)
        before_examples = n
        try:
            for n, example in enumerate(ds, start=before_examples + 1):
                # The stream state after this example (a small dict, copied): where a resume restarts.
                after = ds.state_dict() if tracked else None
                where = f"{self._where()}, example {n}"
                if self.chat:
                    example_pieces = conversation_pieces(example, where, self.skipped_records)
                else:
                    example_pieces = doc.whole(record_text(example, self.text_field, where))
                handed = 0  # pieces of this example yielded, the skipped ones included
                last: tuple[str, bool] | None = None
                for piece in example_pieces:
                    if last is not None:
                        handed += 1
                        if handed > skip:
                            if tracked:
                                self._mark(before, n - 1, handed, doc.empty_documents)
                            yield last[0], last[1], int(last[1])
                    last = piece
                if tracked:  # the position after this example's last piece is the next example
                    self._mark(after, n, 0, doc.empty_documents)
                if last is not None and handed + 1 > skip:
                    yield last[0], last[1], int(last[1])
                elif last is None:  # an empty document or a skipped record: progress only
                    yield "", False, 1
                skip, before = 0, after
        except GPT2LabError:
            raise
        except Exception as e:  # a network failure mid-stream: the run can be resumed
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise GPT2LabError(
                f"reading the {self._where()} failed after {n} examples: {reason}; run the same command again to resume"
            ) from None
        self.stats.empty_documents += doc.empty_documents
