"""The preference-pair store (SQLAlchemy; SQLite by default, PostgreSQL for teams). No torch.

    from align.store import Store
    store = Store("sqlite:///data/preferences.db").init()

See docs/store.md.
"""

from align.data.formats import DataError
from align.store.store import (
    CHOICES,
    DEFAULT_URL,
    Annotator,
    Comparison,
    ImportReport,
    Label,
    LabelExists,
    NotFound,
    RequestIdConflict,
    Store,
    StoreError,
    check_text,
    hash_password,
    verify_password,
)

__all__ = ["Store", "StoreError", "NotFound", "LabelExists", "RequestIdConflict", "DataError",
           "Label", "Comparison", "Annotator", "ImportReport", "CHOICES", "DEFAULT_URL",
           "check_text", "hash_password", "verify_password"]
