"""Reading, scanning, checking and rewriting SB3 checkpoint zips as untrusted input."""
