use pushgrid_keeper::{KeeperConfig, Listeners, ROLE, run};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    Ok(
        pushgrid_common::cli::role_main::<KeeperConfig, _, _>(
            ROLE,
            |config, shutdown| async move {
                let listeners = Listeners::bind(&config).await?;
                run(config, listeners, shutdown).await
            },
        )
        .await?,
    )
}
