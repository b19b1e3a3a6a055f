"""SFT data layer: dataset files -> validated rows -> token ids + labels -> padded batches."""

from ..kernels import IGNORE_INDEX  # re-exported: the data layer writes it into labels
from .chat_templates import (
    CHAT_TEMPLATES,
    ChatTemplate,
    get_chat_template,
    list_chat_templates,
    render_chat,
    show_masked_sample,
    train_on_responses_only,
)
from .collate import pad_batch
from .convert import alpaca_messages, sharegpt_messages, standardize_sharegpt
from .formats import (
    ALPACA,
    FORMATS,
    MESSAGE_FIELDS,
    MESSAGES,
    PROMPT_COMPLETION,
    SHAREGPT,
    TEXT,
    Example,
    check_format_name,
    detect_format,
    register_format,
    validate_record,
)
# oasst and pretokenized register their formats with formats.register_format when imported (here, in this order)
from .oasst import OASST, is_oasst_tree, oasst_conversations
from .preference import (
    KTOExample,
    PreferencePair,
    kto_examples,
    load_preference_records,
    preference_pairs,
    tokenize_kto,
    tokenize_preference,
)
from .preference_collate import collate_kto, collate_preference
from .pretokenized import TOKENIZED, is_pretokenized, validate_pretokenized
from .records import Record, as_record, load_records, records_from_rows
from .row_checks import ROLES
from .tokenize import TRAIN_ON, tokenize_dataset, tokenize_record

from .packing import OVERLONG_POLICIES, PACKING_STRATEGIES, collate_packed, pack_examples
from .prepare import prepare_dataset
from .truncation import OVERLONG_ROWS, TRUNCATION_MODES

__all__ = [
    "KTOExample",
    "PreferencePair",
    "collate_kto",
    "collate_preference",
    "kto_examples",
    "load_preference_records",
    "preference_pairs",
    "tokenize_kto",
    "tokenize_preference",
    "OVERLONG_POLICIES",
    "PACKING_STRATEGIES",
    "collate_packed",
    "pack_examples",
    "prepare_dataset",
    "OVERLONG_ROWS",
    "TRUNCATION_MODES",
    "ALPACA",
    "CHAT_TEMPLATES",
    "FORMATS",
    "IGNORE_INDEX",
    "MESSAGES",
    "MESSAGE_FIELDS",
    "OASST",
    "PROMPT_COMPLETION",
    "ROLES",
    "SHAREGPT",
    "TEXT",
    "TOKENIZED",
    "TRAIN_ON",
    "ChatTemplate",
    "Example",
    "Record",
    "alpaca_messages",
    "as_record",
    "check_format_name",
    "detect_format",
    "get_chat_template",
    "is_oasst_tree",
    "is_pretokenized",
    "list_chat_templates",
    "load_records",
    "oasst_conversations",
    "pad_batch",
    "records_from_rows",
    "register_format",
    "render_chat",
    "sharegpt_messages",
    "show_masked_sample",
    "standardize_sharegpt",
    "tokenize_dataset",
    "tokenize_record",
    "train_on_responses_only",
    "validate_pretokenized",
    "validate_record",
]
