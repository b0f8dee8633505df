"""Reading a matrix file: safe YAML that refuses what would silently lose or blow up data.

On top of PyYAML's safe loader (plain data only, no Python object tags) it refuses:
- a duplicate key in one mapping (PyYAML keeps the last silently, so a whole ``seeds:`` or
  ``axes:`` entry would vanish), with both line numbers;
- a key that is not a string (``1:``, ``on:``/``yes:`` which YAML 1.1 reads as true), since
  every key names a field, axis or profile;
- alias bombs: aliases are shared references, cheap to load but expanded by every later
  walk (merge, JSON, error messages), so the document's size with aliases expanded is bounded;
- files that are too large or not UTF-8.
"""
from __future__ import annotations

import reprlib
from pathlib import Path
from typing import Any, Optional

import yaml

MAX_FILE_BYTES = 1 << 20  # a matrix is a page of YAML; 1 MiB leaves room for generated ones
MAX_EXPANDED_NODES = 100_000  # nodes of the document with every alias expanded
STR_TAG = "tag:yaml.org,2002:str"
MERGE_TAG = "tag:yaml.org,2002:merge"


class MatrixYAMLError(ValueError):
    """A matrix file that cannot be read as plain data; the message is one line."""


_REPR = reprlib.Repr()  # Python 3.10 has no keyword arguments here
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist, _REPR.maxtuple = 3, 6, 6, 6
_REPR.maxstring, _REPR.maxlong, _REPR.maxother = 200, 80, 80  # callers cut further


def shorten(value: Any, limit: int = 60) -> str:
    """repr of ``value`` cut to ``limit`` characters, so no error line grows with the input.

    reprlib never builds the whole repr, which for a shared (aliased) structure could be huge."""
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[: limit - 5] + "…" + text[-4:]


class _MatrixLoader(yaml.SafeLoader):
    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_line: dict[str, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == MERGE_TAG:  # `<<: *anchor` may legitimately repeat keys it merges
                continue
            line = key_node.start_mark.line + 1
            if key_node.tag != STR_TAG or not isinstance(key_node.value, str):
                raise MatrixYAMLError(f"line {line}: key {shorten(self.construct_object(key_node))} is not a string "
                                      "(keys name fields, axes and profiles; quote it)")
            if key_node.value in first_line:
                raise MatrixYAMLError(f"line {line}: duplicate key {shorten(key_node.value)} "
                                      f"(first at line {first_line[key_node.value]}); YAML would keep only the last")
            first_line[key_node.value] = line
        return super().construct_mapping(node, deep=deep)


def _expanded_size(node: yaml.Node, memo: dict[int, Optional[int]]) -> int:
    """Number of nodes with aliases expanded; each distinct node is sized once, so a bomb of
    depth d costs O(d) here while its expansion would cost 10^d."""
    if id(node) in memo:
        if memo[id(node)] is None:  # reached again while being sized: it contains itself
            raise MatrixYAMLError(f"line {node.start_mark.line + 1}: an alias (*name) refers to a value that "
                                  "contains it; the expansion never ends")
        return memo[id(node)]
    memo[id(node)] = None
    if isinstance(node, yaml.MappingNode):
        size = 1 + sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
    elif isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_size(v, memo) for v in node.value)
    else:
        size = 1
    memo[id(node)] = size
    return size


def load_yaml(path: str | Path) -> Any:
    """The plain data of a matrix file. Raises OSError (unreadable) or MatrixYAMLError."""
    with open(path, "rb") as handle:
        data = handle.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise MatrixYAMLError(f"larger than {MAX_FILE_BYTES // 1024} KiB; a matrix file is a page of YAML")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise MatrixYAMLError(f"not UTF-8 text (byte {err.start}, line {line}); save the file as UTF-8") from None
    loader = _MatrixLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, {}) > MAX_EXPANDED_NODES:
            raise MatrixYAMLError(f"more than {MAX_EXPANDED_NODES:,} values, counting each alias (*name) as "
                                  "expanded; a matrix is far smaller (an alias bomb?)")
        return loader.construct_document(node)
    except RecursionError:
        raise MatrixYAMLError("nested too deeply") from None
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise MatrixYAMLError(f"not valid YAML{where}: {shorten(err.problem or str(err), 120)[1:-1]}") from None
    except yaml.YAMLError as err:
        raise MatrixYAMLError(f"not valid YAML: {shorten(str(err), 120)[1:-1]}") from None
    finally:
        loader.dispose()
