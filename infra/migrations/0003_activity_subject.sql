-- The activity feed remembers which aggregate each item is about (the card, project, run or
-- workspace whose event it shows). Most events do not repeat their card or project (a card
-- moved, a run finished); the activity projector copies them from the subject's earlier items,
-- found through this index, instead of reading another projector's tables.
ALTER TABLE rm_activity ADD COLUMN subject_id uuid;
CREATE INDEX rm_activity_subject_idx ON rm_activity (subject_id, position);
