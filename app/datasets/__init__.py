"""The datasets resource: uploaded JSONL/CSV files, validated line by line, stored once, referenced by id."""
