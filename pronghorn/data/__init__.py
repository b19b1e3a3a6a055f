"""SFT data layer: dataset files -> validated rows -> token ids + labels -> padded batches."""

from .collate import pad_batch
from .formats import (
    FORMATS,
    MESSAGE_FIELDS,
    MESSAGES,
    PROMPT_COMPLETION,
    ROLES,
    TEXT,
    Example,
    check_format_name,
    detect_format,
    validate_record,
)
from .records import Record, as_record, load_records, records_from_rows
from .tokenize import IGNORE_INDEX, TRAIN_ON, tokenize_dataset, tokenize_record

__all__ = [
    "FORMATS",
    "IGNORE_INDEX",
    "MESSAGES",
    "MESSAGE_FIELDS",
    "PROMPT_COMPLETION",
    "ROLES",
    "TEXT",
    "TRAIN_ON",
    "Example",
    "Record",
    "as_record",
    "check_format_name",
    "detect_format",
    "load_records",
    "pad_batch",
    "records_from_rows",
    "tokenize_dataset",
    "tokenize_record",
    "validate_record",
]
