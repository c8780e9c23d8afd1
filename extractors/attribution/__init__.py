"""Attribution scores with bergson, per pool row against the query rows: `--kinds attribution`."""
