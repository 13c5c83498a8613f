"""Human feedback in the browser: ``rlhfkit label`` (docs/human-feedback.md).

:mod:`~rlhfkit.label.session` keeps a labelling session on disk (no web dependency);
:mod:`~rlhfkit.label.server` serves its page (the ``label`` extra: FastAPI, uvicorn);
:mod:`~rlhfkit.label.sources` makes a session's items from a file or a stage's model;
:mod:`~rlhfkit.label.simulate` ranks through the page's HTTP API with a scorer standing
in for a person.
"""
