"""The hand-written canonical JSON encoder is byte for byte the standard library's
``json.dumps(sort_keys=True, indent=2, ensure_ascii=False)``."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from invoicer.documents import JsonValue, canonical_json, invoice_to_json
from tests.golden.casefiles import case_names, load_case, rate_case

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.text(),  # every code point: quotes, controls, non-ASCII, surrogates
)
documents = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=5), st.dictionaries(st.text(), children, max_size=5)
    ),
    max_leaves=40,
)


@given(documents)
def test_equals_the_standard_library(document: JsonValue) -> None:
    assert canonical_json(document) == json.dumps(
        document, sort_keys=True, indent=2, ensure_ascii=False
    )


def test_every_golden_document_equals_the_standard_library() -> None:
    for name in case_names():
        document = json.loads(invoice_to_json(rate_case(load_case(name))))
        assert canonical_json(document) == json.dumps(
            document, sort_keys=True, indent=2, ensure_ascii=False
        )
