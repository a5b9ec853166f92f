-- fedslim coordinator schema before Alembic (release 0.x, coordinator/store.py at 5389d96),
-- generated from its SQLAlchemy metadata for sqlite (CreateTable(table).compile(dialect) per
-- table of coordinator.store.metadata): the schema Alembic must upgrade from.

CREATE TABLE agents (
	id VARCHAR(64) NOT NULL,
	name VARCHAR(100) NOT NULL,
	token_hash VARCHAR(64) NOT NULL,
	enrolled_at FLOAT NOT NULL,
	last_seen FLOAT NOT NULL,
	info TEXT NOT NULL,
	revoked_at FLOAT,
	memory_budget_bytes INTEGER,
	PRIMARY KEY (id),
	UNIQUE (token_hash)
);

CREATE TABLE declines (
	federation_id VARCHAR(64) NOT NULL,
	round INTEGER NOT NULL,
	agent_id VARCHAR(64) NOT NULL,
	attempt INTEGER NOT NULL,
	needed_bytes INTEGER,
	reason TEXT NOT NULL,
	declined_at FLOAT NOT NULL,
	PRIMARY KEY (federation_id, round, agent_id)
);

CREATE TABLE downloads (
	federation_id VARCHAR(64) NOT NULL,
	round INTEGER NOT NULL,
	bytes INTEGER NOT NULL,
	PRIMARY KEY (federation_id, round)
);

CREATE TABLE federations (
	id VARCHAR(64) NOT NULL,
	config TEXT NOT NULL,
	status VARCHAR(16) NOT NULL,
	current_round INTEGER NOT NULL,
	model_version INTEGER NOT NULL,
	created_at FLOAT NOT NULL,
	error TEXT,
	PRIMARY KEY (id)
);

CREATE TABLE models (
	federation_id VARCHAR(64) NOT NULL,
	version INTEGER NOT NULL,
	blob VARCHAR(64) NOT NULL,
	patch_blob VARCHAR(64),
	state_blob VARCHAR(64),
	reshape_blob VARCHAR(64),
	created_at FLOAT NOT NULL,
	PRIMARY KEY (federation_id, version)
);

CREATE TABLE rounds (
	federation_id VARCHAR(64) NOT NULL,
	round INTEGER NOT NULL,
	status VARCHAR(16) NOT NULL,
	attempt INTEGER NOT NULL,
	base_version INTEGER NOT NULL,
	selected TEXT NOT NULL,
	opened_at FLOAT NOT NULL,
	deadline FLOAT NOT NULL,
	closed_at FLOAT,
	metrics TEXT,
	PRIMARY KEY (federation_id, round)
);

CREATE TABLE updates (
	federation_id VARCHAR(64) NOT NULL,
	round INTEGER NOT NULL,
	agent_id VARCHAR(64) NOT NULL,
	attempt INTEGER NOT NULL,
	received_at FLOAT NOT NULL,
	num_samples INTEGER NOT NULL,
	bytes INTEGER NOT NULL,
	blob VARCHAR(64) NOT NULL,
	report TEXT NOT NULL,
	PRIMARY KEY (federation_id, round, agent_id)
);
