"""One module per vision-language family; each defines one `VisionFamily` subclass instance."""
