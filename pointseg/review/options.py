"""The knobs of the review page: one typed config (``review:`` in a pipeline config)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from pointseg.uncertainty import NUM_SUGGESTIONS, SUGGESTION_RADIUS, SUGGESTION_SEPARATION, UNCERTAIN_THRESHOLD


class ReviewOptions(BaseModel):
    """How ``OUTPUT/review/`` and ``OUTPUT/suggestions.jsonl`` are made (:func:`pointseg.review.page.write_review`)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="write the review page at the end of a pipeline run")
    threshold: float = Field(UNCERTAIN_THRESHOLD, ge=0, le=1,
                             description="a pixel is uncertain above this (the uncertain fraction)")
    num_suggestions: int = Field(NUM_SUGGESTIONS, ge=0, description="next clicks suggested per image")
    suggestion_radius: float = Field(SUGGESTION_RADIUS, gt=0, le=1,
                                     description="window of a suggestion's score, fraction of the long side")
    suggestion_separation: float = Field(SUGGESTION_SEPARATION, ge=0, le=1,
                                         description="least distance between two suggestions, fraction of the long side")
    page_size: int = Field(100, ge=1, description="cards per page")
    thumb_size: int = Field(160, ge=16, description="long side of a thumbnail, px")
    detail_size: int = Field(512, ge=32, description="long side of a detail picture, px (never enlarged)")
    chunk_size: int = Field(250, ge=1, description="images per details/chunk-N.js file")
    jpeg_quality: int = Field(85, ge=1, le=95)
    title: str | None = Field(None, description="page title (default: 'pointseg review: <method>')")
