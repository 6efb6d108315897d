"""Cell records and what is made of them (SPEC 7): the record files, atomic writes and the run lock,
provenance and the device class, per-token logs, leaderboards (Markdown, CSV, JSON, HTML, plots)
and the report."""
