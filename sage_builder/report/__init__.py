"""``sage report RUN``: one static page of a run (``report.html``), and the pictures stages draw."""
