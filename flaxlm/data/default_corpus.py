"""A default training corpus built from English text that ships with every Python installation.

Nothing is downloaded: the text is assembled from the running interpreter's standard library, so the main
recipe trains offline on any machine. It is, in order:

1. the Zen of Python (decoded from the `this` module's source, which is not imported, so nothing prints);
2. the Python language and library reference topics of `pydoc_data.topics` (what `help('for')` shows),
   sorted by topic name; skipped where a distribution strips that module;
3. the docstrings (module, class and function, indentation cleaned) of the pure-Python standard-library
   modules in `MODULES`, in that order, read with `ast` from their source files (nothing is imported;
   modules missing from an installation are skipped), until the corpus holds `TARGET_CHARS` characters.

The pieces are joined by blank lines. The result is deterministic for a given Python version (about
750 KB of mostly ASCII English prose and code on CPython 3.11) and may change between Python versions;
a saved tokenizer's fingerprint records the vocabulary actually trained on.
"""

import ast
import codecs
import functools
import pathlib
import sysconfig

MODULES = (
    "textwrap", "difflib", "argparse", "collections/__init__", "functools", "os", "pathlib", "json/__init__",
    "re/__init__", "typing", "dataclasses", "logging/__init__", "subprocess", "unittest/case", "email/message",
    "http/client", "urllib/parse", "statistics", "fractions", "_pydecimal", "calendar", "datetime", "inspect",
    "threading", "shutil", "tarfile", "csv", "string", "random", "heapq", "bisect", "enum", "contextlib", "abc",
    "ast", "pickle", "configparser", "optparse", "pdb", "doctest", "tempfile", "socket", "ssl", "asyncio/events",
    "asyncio/tasks", "xml/dom/minidom", "turtle", "pydoc", "locale", "gettext", "codecs", "_pyio", "sched",
    "queue", "smtplib", "imaplib", "ftplib", "mailbox", "cmd", "shlex", "glob", "fnmatch", "copy", "pprint",
    "reprlib", "weakref", "numbers", "operator", "traceback", "warnings", "wave", "zipapp", "venv/__init__",
    "sqlite3/__init__", "uuid", "ipaddress", "hashlib", "hmac", "secrets", "base64", "quopri", "html/parser",
    "http/server", "urllib/request", "xmlrpc/client", "tkinter/__init__",
)
TARGET_CHARS = 750_000
_DOCUMENTED = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def _stdlib() -> pathlib.Path:
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def _zen() -> list[str]:
    source = _stdlib() / "this.py"
    if not source.is_file():
        return []
    for node in ast.parse(source.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            return [codecs.decode(node.value.value, "rot13")]
    return []


def _pydoc_topics() -> list[str]:
    try:
        from pydoc_data.topics import topics
    except ImportError:
        return []
    return [topics[name].strip() for name in sorted(topics)]


def _docstrings(module: str) -> list[str]:
    source = _stdlib() / f"{module}.py"
    if not source.is_file():
        return []
    tree = ast.parse(source.read_text(encoding="utf-8"))
    texts = (ast.get_docstring(node) for node in ast.walk(tree) if isinstance(node, _DOCUMENTED))
    return [text for text in texts if text]


@functools.lru_cache(maxsize=1)
def default_corpus_text() -> str:
    """The default corpus text (see the module docstring); computed once per process."""
    pieces = _zen() + _pydoc_topics()
    size = sum(len(p) + 2 for p in pieces)
    for module in MODULES:
        if size >= TARGET_CHARS:
            break
        docstrings = _docstrings(module)
        pieces.extend(docstrings)
        size += sum(len(d) + 2 for d in docstrings)
    return "\n\n".join(pieces) + "\n"
