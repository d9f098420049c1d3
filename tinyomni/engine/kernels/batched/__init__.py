"""Batched decode (2..16 activation rows) on AMX int8 tiles for the int4 and int8 formats: batched.cpp.
Its arithmetic is the VNNI GEMV's, so the formats' own references (`int4.reference.linear_q8`,
`int8.reference.linear_q8`) are its references too."""
