"""What a run leaves behind: ``results.json``/``results.md`` (:mod:`.results`), the deployment table (:mod:`.deploy`) and
the HTML report (:mod:`.html`)."""
