"""The cache report (`distillery inspect CACHE --report report.html`, and the teacher flow's artifact).

    content.py    gather the numbers from a cache (CacheReport)
    sections.py   the report as titled sections of lines and tables
    figures.py    matplotlib (Agg) figures as PNG bytes
    html.py       one self-contained HTML page (figures embedded as base64)
    markdown.py   the same sections in markdown, without figures
"""
