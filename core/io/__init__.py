"""Reading scans: ingest, DICOM, raster files, pixel maths, PHI, the Scan record."""
