"""What a run optimises, one file per task (retrieval, vqa, nlvr2); metrics.py holds the official
metric ports."""
