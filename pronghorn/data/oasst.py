"""OpenAssistant message trees -> root-to-leaf conversations (``messages`` rows).

A tree row (``oasst1``/``oasst2`` "trees" export) is ``{"message_tree_id", "prompt": node}`` where a node is
``{"text", "role": "prompter" | "assistant", "rank", "deleted", "replies": [node, ...]}``. Each root-to-leaf
path is a conversation (prompter -> user, assistant -> assistant). A path that ends with a prompter message is
cut after its last assistant message; deleted nodes are skipped with their subtrees.

With ``best_only=True`` only the top-ranked assistant reply (``rank == 0``; the lowest rank present, else the
first reply, when no reply has rank 0) is followed at each assistant branch, while every prompter follow-up is
still followed; with ``best_only=False`` every leaf gives a conversation.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from ..errors import DataError
from .formats import Example, register_format
from .records import Record, as_record
from .row_checks import require_string

__all__ = ["OASST", "is_oasst_tree", "oasst_conversations"]

OASST = "oasst"
OASST_ROLES = {"prompter": "user", "assistant": "assistant"}


def is_oasst_tree(row: Mapping[str, Any]) -> bool:
    """True for an OpenAssistant tree row: a ``prompt`` object with ``text`` and ``role`` 'prompter'."""
    node = row.get("prompt")
    return isinstance(node, dict) and node.get("role") == "prompter" and "text" in node


def oasst_conversations(trees: Iterable[Record | Mapping[str, Any]], best_only: bool = True,
                        source: str = "<memory>") -> list[Record]:
    """Every tree's root-to-leaf conversations as ``{"messages": [...], "message_tree_id", "path"}`` rows.

    Each returned :class:`Record` keeps the tree's file and row (so errors point at the tree); ``path`` lists
    the tree field of each message (``prompt.replies[2].text``). Raises :class:`DataError` naming the file, row
    and field for a malformed node (missing/empty/non-string ``text``, unknown ``role``, a reply with the same
    role as its parent, a root that is not a prompter message).
    """
    out = []
    for i, tree in enumerate(trees):
        rec = as_record(tree, source, i)
        for messages, paths in _tree_conversations(rec, best_only):
            row = {"messages": messages, "path": paths}
            if "message_tree_id" in rec.row:
                row["message_tree_id"] = rec.row["message_tree_id"]
            out.append(Record(source=rec.source, index=rec.index, row=row, kind=rec.kind))
    if not out:
        raise DataError(f"{source}: no conversation with an assistant reply in these trees")
    return out


def _tree_conversations(rec: Record, best_only: bool) -> list[tuple[list[dict], list[str]]]:
    if "prompt" not in rec.row:
        raise rec.error("prompt", "missing (an OpenAssistant tree row needs a 'prompt' message node)")
    root = rec.row["prompt"]
    check_node(rec, root, "prompt", None)
    if root["role"] != "prompter":
        raise rec.error("prompt.role", f"the root message must be from the 'prompter', got {root['role']!r}")
    results: list[tuple[list[dict], list[str]]] = []
    seen: set[tuple[str, ...]] = set()

    def walk(node: dict, path: str, msgs: list[dict], paths: list[str]) -> None:
        msgs = msgs + [{"role": OASST_ROLES[node["role"]], "content": node["text"]}]
        paths = paths + [f"{path}.text"]
        replies = node.get("replies") or []
        if not isinstance(replies, list):
            raise rec.error(f"{path}.replies", "must be a list of message nodes")
        kept = []
        for j, child in enumerate(replies):
            child_path = f"{path}.replies[{j}]"
            check_node(rec, child, child_path, node["role"])
            if not child.get("deleted", False):
                kept.append((j, child, child_path))
        if best_only and node["role"] == "prompter" and len(kept) > 1:
            kept = [_top_ranked(kept)]
        if not kept:
            while msgs and msgs[-1]["role"] != "assistant":  # end on the last assistant message
                msgs, paths = msgs[:-1], paths[:-1]
            key = tuple(paths)
            if msgs and key not in seen:
                seen.add(key)
                results.append((msgs, paths))
            return
        for _, child, child_path in kept:
            walk(child, child_path, msgs, paths)

    walk(root, "prompt", [], [])
    return results


def _top_ranked(kept: list[tuple[int, dict, str]]) -> tuple[int, dict, str]:
    ranked = [k for k in kept if isinstance(k[1].get("rank"), int)]
    return min(ranked, key=lambda k: k[1]["rank"]) if ranked else kept[0]


def check_node(rec: Record, node: Any, path: str, parent_role: str | None) -> None:
    """Check one message node of a tree (its role alternates with ``parent_role``; a kept node has text)."""
    if not isinstance(node, dict):
        raise rec.error(path, f"expected a message node object, got {type(node).__name__}")
    if "role" not in node:
        raise rec.error(f"{path}.role", "missing")
    role = node["role"]
    if role not in OASST_ROLES:
        raise rec.error(f"{path}.role", f"unknown role {role!r}; expected 'prompter' or 'assistant'")
    if parent_role is not None and role == parent_role:
        raise rec.error(f"{path}.role", f"a reply to a {parent_role!r} message must come from the other side, "
                                        f"got {role!r} again")
    if node.get("deleted", False):
        return
    require_string(rec, f"{path}.text", node.get("text"), "text" in node)


def _validate_oasst(rec: Record) -> Example:
    """A tree row on its own stands for its first top-ranked conversation (``tokenize_dataset`` expands a
    tree into all of its conversations)."""
    convs = _tree_conversations(rec, best_only=True)
    if not convs:
        raise rec.error("prompt", "the tree has no assistant reply to train on")
    messages, paths = convs[0]
    return Example(rec, OASST, "prompt", messages=messages, fields=tuple(p[: -len(".text")] for p in paths))


register_format(OASST, is_oasst_tree, _validate_oasst)
