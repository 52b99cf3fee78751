"""Files of a run and of a data set, local or ``gs://``: storage (the file API), jsonl (rows with
one torn-line policy), rundir (where a run keeps what)."""
