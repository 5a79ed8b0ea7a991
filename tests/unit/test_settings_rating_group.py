"""The rating worker's static group membership setting (METERLINE_RATING_GROUP_INSTANCE_ID)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from meterline.settings import Settings


def test_the_group_instance_id_is_unset_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("METERLINE_RATING_GROUP_INSTANCE_ID", raising=False)
    assert Settings().rating_group_instance_id is None


def test_the_group_instance_id_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METERLINE_RATING_GROUP_INSTANCE_ID", "rating-worker-1")
    assert Settings().rating_group_instance_id == "rating-worker-1"


def test_an_empty_group_instance_id_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METERLINE_RATING_GROUP_INSTANCE_ID", "")
    with pytest.raises(ValidationError, match="rating_group_instance_id"):
        Settings()
