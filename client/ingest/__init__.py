"""Site-side ingestion: EHR exports (FHIR R4 bundles, CSV event tables) -> canonical timelines."""

from pmlm.client.ingest.reader import RecordReader, list_record_files

__all__ = ["RecordReader", "list_record_files"]
