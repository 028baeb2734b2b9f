"""overnight: the harness (src/harness/), the research room (src/research/) and the lab (src/lab/)."""
