"""What a job writes: text, JSONL and CSV records and text sidecars (output), XMP sidecars and embedded
metadata (metadata), the HTML contact sheet (contactsheet), one writer per output (locks), and the metrics
and HTML report of `capcli eval` (evaluate)."""
