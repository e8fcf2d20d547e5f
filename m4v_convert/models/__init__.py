"""What every converted model shares, whichever backbone it came from (see :mod:`.converted`)."""

from m4v_convert.models.converted import ConvertedModelMixin, converted_init

__all__ = ["ConvertedModelMixin", "converted_init"]
