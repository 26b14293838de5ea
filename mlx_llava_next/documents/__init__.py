"""OCR of documents: image files, folders and PDFs, page by page, resumable (see engine.ocr_document)."""
