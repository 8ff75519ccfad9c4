"""Errors of retrieval, and :func:`import_faiss`, which imports the optional faiss dependency or says how
to install it."""

from __future__ import annotations

from personalize.data.images import DataError


class RetrievalError(DataError):
    """A problem with an index or a query that is the user's to fix; the message names the file or key."""


class FaissMissingError(RetrievalError, ImportError):
    """faiss, the optional dependency of retrieval, is not installed."""


def import_faiss():
    """The ``faiss`` module, or :class:`FaissMissingError` saying how to install it."""
    try:
        import faiss
    except ImportError as err:
        raise FaissMissingError(
            f"retrieval indexes need faiss, which is not installed ({err}); install it with "
            "`pip install faiss-cpu` or `pip install -e \".[retrieval]\"`") from None
    return faiss
