"""One thin module per pipeline stage: read earlier parts, call the library, write a section."""
